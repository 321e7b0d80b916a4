//! Real eBPF capture in a child cgroup (needs root; CI is root here).
//!
//! Every test makes its own child cgroup of the cgroup-v2 mount, attaches
//! there only, moves only its own client process in, captures only loopback
//! prefixes, and talks only to listeners it started. Set
//! `KT_SKIP_EBPF_TESTS=1` to opt out explicitly on hosts without BPF.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use guard::capture::{Capture, CaptureSpec, Retargeted, SocketExemption, Supervisor, Targets};
use guard::config::IpPrefix;
use guard_tests::cgroup::TestCgroup;

const CLIENT: &str = env!("CARGO_BIN_EXE_kt-test-client");
/// Hang guard only (never a speed assertion).
const WAIT: Duration = Duration::from_secs(20);
/// The mark older kt versions exempted; now it must mean nothing.
const OLD_GUARD_MARK: u32 = 0x6b74_0001;

fn skip() -> bool {
    guard_tests::ebpf_tests_off("capture")
}

/// A free port on a loopback address (bound then released).
fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    capture: Capture,
    listener4: TcpListener,
    listener6: TcpListener,
    port: u16,
    cgroup: TestCgroup,
}

fn setup(label: &str) -> Setup {
    setup_with(label, |_| {})
}

/// As [`setup`], with the spec adjusted by `adjust` before attaching.
fn setup_with(label: &str, adjust: impl FnOnce(&mut CaptureSpec)) -> Setup {
    let cgroup = TestCgroup::new(label).expect(
        "creating a child cgroup of the cgroup2 mount failed: these tests need root and cgroup v2 \
         (set KT_SKIP_EBPF_TESTS=1 to opt out explicitly)",
    );
    let listener4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let listener6 = TcpListener::bind("[::1]:0").unwrap();
    let port = free_port("127.77.0.1");
    let SocketAddr::V4(l4) = listener4.local_addr().unwrap() else {
        unreachable!()
    };
    let SocketAddr::V6(l6) = listener6.local_addr().unwrap() else {
        unreachable!()
    };
    let mut spec = CaptureSpec {
        cgroup: cgroup.path().to_path_buf(),
        listen4: l4,
        listen6: Some(l6),
        prefixes: vec![
            IpPrefix {
                addr: "127.77.0.0".parse().unwrap(),
                len: 16,
            },
            IpPrefix {
                addr: "::1".parse().unwrap(),
                len: 128,
            },
        ],
        ports: vec![port],
        port_wide: false,
        own_ports: vec![],
        refuse_udp: true,
        refuse_other_netns: true,
        containers: None,
        pin_dir: None,
        keep_attached: false,
    };
    adjust(&mut spec);
    let capture = Capture::attach(&spec).expect("attaching the capture programs to a child cgroup");
    Setup {
        capture,
        listener4,
        listener6,
        port,
        cgroup,
    }
}

/// Starts the client outside the cgroup, moves it in, then lets it run.
fn run_client(cgroup: &mut TestCgroup, args: &[&str]) -> u32 {
    run_in(cgroup, Command::new(CLIENT).args(args))
}

/// As [`run_client`], for a command that ends up exec'ing the client.
fn run_in(cgroup: &mut TestCgroup, command: &mut Command) -> u32 {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let pid = cgroup.adopt(child).unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    pid
}

fn output(cgroup: &mut TestCgroup, pid: u32) -> String {
    let out = cgroup.wait(pid).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// Accepts one connection (in a thread, so a missing one fails instead of hanging).
fn accept(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    let l = listener.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(l.accept());
    });
    rx.recv_timeout(WAIT).ok()?.ok()
}

fn reply(stream: TcpStream, text: &str) {
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "hello\n");
    (&stream).write_all(format!("{text}\n").as_bytes()).unwrap();
}

#[test]
fn tcp_to_a_captured_ipv4_prefix_arrives_at_the_listener_with_origin_and_pid() {
    if skip() {
        return;
    }
    let mut s = setup("v4");
    let dest = format!("127.77.0.1:{}", s.port);
    let pid = run_client(&mut s.cgroup, &["tcp", &dest]);
    let (stream, peer) =
        accept(&s.listener4).expect("the captured connection never reached the listener");
    let origin = s
        .capture
        .take_origin(peer)
        .expect("no origin record for the accepted connection");
    assert_eq!(origin.original, dest.parse::<SocketAddr>().unwrap());
    assert_eq!(origin.pid, pid);
    assert_eq!(origin.uid, 0);
    assert_ne!(origin.cgroup_id, 0);
    // Who did it: read while the client still waits for our reply.
    let who = guard::capture::process_info(origin.pid);
    assert!(
        who.exe
            .as_deref()
            .is_some_and(|e| e.ends_with("kt-test-client")),
        "{who:?}"
    );
    let name = s
        .cgroup
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        who.cgroup.as_deref().is_some_and(|c| c.ends_with(&name)),
        "{who:?}"
    );
    reply(stream, "from-listener");
    let out = output(&mut s.cgroup, pid);
    assert_eq!(field(&out, "reply"), Some("from-listener"), "{out}");
    // The process still believes it talks to the original destination.
    assert_eq!(field(&out, "peer"), Some(dest.as_str()), "{out}");
}

#[test]
fn ipv4_mapped_destination_on_an_ipv6_socket_is_captured() {
    if skip() {
        return;
    }
    let mut s = setup("mapped");
    let dest = format!("[::ffff:127.77.0.2]:{}", s.port);
    let pid = run_client(&mut s.cgroup, &["tcp", &dest]);
    let (stream, peer) = accept(&s.listener4).expect("mapped connection not captured");
    let origin = s.capture.take_origin(peer).expect("no origin record");
    assert_eq!(
        origin.original,
        format!("127.77.0.2:{}", s.port)
            .parse::<SocketAddr>()
            .unwrap()
    );
    assert_eq!(origin.pid, pid);
    reply(stream, "mapped-ok");
    let out = output(&mut s.cgroup, pid);
    assert_eq!(field(&out, "reply"), Some("mapped-ok"), "{out}");
    assert_eq!(field(&out, "peer"), Some(dest.as_str()), "{out}");
}

#[test]
fn ipv6_destination_is_captured_to_the_ipv6_listener() {
    if skip() {
        return;
    }
    let mut s = setup("v6");
    let dest = format!("[::1]:{}", s.port);
    let pid = run_client(&mut s.cgroup, &["tcp", &dest]);
    let (stream, peer) = accept(&s.listener6).expect("IPv6 connection not captured");
    let origin = s.capture.take_origin(peer).expect("no origin record");
    assert_eq!(origin.original, dest.parse::<SocketAddr>().unwrap());
    assert_eq!(origin.pid, pid);
    reply(stream, "v6-ok");
    let out = output(&mut s.cgroup, pid);
    assert_eq!(field(&out, "peer"), Some(dest.as_str()), "{out}");
}

#[test]
fn udp_to_a_captured_prefix_is_refused() {
    if skip() {
        return;
    }
    let mut s = setup("udp");
    let dest = format!("127.77.0.1:{}", s.port);
    let pid = run_client(&mut s.cgroup, &["udp", &dest]);
    let out = output(&mut s.cgroup, pid);
    let eperm = libc::EPERM.to_string();
    assert_eq!(field(&out, "udp_error"), Some(eperm.as_str()), "{out}");
    assert_eq!(
        field(&out, "udp_connect_error"),
        Some(eperm.as_str()),
        "{out}"
    );
}

/// Takes a copy of descriptor `fd` of process `pid` (our own child).
fn take_fd(pid: u32, fd: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls; the returned descriptors are checked and owned.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as libc::c_int;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd);
        use std::os::fd::AsRawFd;
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) as libc::c_int;
        assert!(got >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from_raw_fd(got)
    }
}

/// A TCP socket created by a process in the cgroup (so the hooks apply to
/// it), handed to this test. The process lives until the returned stdin
/// is dropped.
fn socket_from_cgroup(
    cgroup: &mut TestCgroup,
    dest: SocketAddr,
) -> (socket2::Socket, std::process::ChildStdin) {
    let mut child = Command::new(CLIENT)
        .args(["hold", &dest.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let pid = cgroup.adopt(child).unwrap();
    stdin.write_all(b"go\n").unwrap();
    let fd = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("fd=")?.parse::<i32>().ok())
        .expect("the holder did not report its socket");
    (socket2::Socket::from(take_fd(pid, fd)), stdin)
}

#[test]
fn only_sockets_whose_cookie_kt_registered_and_processes_outside_go_direct() {
    if skip() {
        return;
    }
    let mut s = setup("exempt");
    let dest: SocketAddr = format!("127.77.0.3:{}", s.port).parse().unwrap();
    let real = TcpListener::bind(dest).unwrap();

    // kt's own upstream sockets: cookie registered before connect.
    let (own, _hold) = socket_from_cgroup(&mut s.cgroup, dest);
    s.capture
        .exemption()
        .exempt(&own)
        .expect("registering the socket cookie");
    own.connect(&dest.into())
        .expect("exempt socket could not connect");
    let (stream, _) = accept(&real).expect("exempt connection did not reach its real destination");
    drop(stream);

    // The same kind of socket from the same cgroup, not registered: captured.
    let (other, _hold2) = socket_from_cgroup(&mut s.cgroup, dest);
    other.connect(&dest.into()).expect("captured connect");
    let (_stream, peer) = accept(&s.listener4).expect("unregistered socket was not captured");
    assert_eq!(s.capture.take_origin(peer).map(|o| o.original), Some(dest));

    // This test process is not in the cgroup.
    let mut direct = TcpStream::connect(dest).unwrap();
    let (stream, _) = accept(&real).expect("outside connection was diverted");
    direct.write_all(b"hello\n").unwrap();
    reply(stream, "outside");
    let mut line = String::new();
    BufReader::new(direct).read_line(&mut line).unwrap();
    assert_eq!(line, "outside\n");
}

/// `setpriv` arguments: user nobody with CAP_NET_RAW as its only capability
/// (what a default container has), which since Linux 5.17 may set SO_MARK.
const NET_RAW_ONLY: [&str; 7] = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all,+net_raw",
    "--ambient-caps=-all,+net_raw",
    "--bounding-set=-all,+net_raw",
    "--",
];

#[test]
fn the_old_guard_mark_set_with_only_cap_net_raw_is_still_captured() {
    if skip() {
        return;
    }
    let mut s = setup("oldmark");
    let dest: SocketAddr = format!("127.77.0.6:{}", s.port).parse().unwrap();
    let real = TcpListener::bind(dest).unwrap();
    real.set_nonblocking(true).unwrap();
    let mark = OLD_GUARD_MARK.to_string();
    let pid = run_in(
        &mut s.cgroup,
        Command::new("setpriv").args(NET_RAW_ONLY).args([
            CLIENT,
            "tcp",
            &dest.to_string(),
            "--mark",
            &mark,
        ]),
    );
    let (stream, peer) = accept(&s.listener4).expect("the marked connection was not captured");
    assert_eq!(s.capture.take_origin(peer).map(|o| o.uid), Some(65534));
    reply(stream, "captured");
    let out = output(&mut s.cgroup, pid);
    assert_eq!(field(&out, "marked"), Some(mark.as_str()), "{out}");
    assert_eq!(field(&out, "reply"), Some("captured"), "{out}");
    assert!(real.accept().is_err(), "the marked socket went direct");
}

#[test]
fn other_ports_of_a_captured_prefix_are_refused_for_tcp_and_udp() {
    if skip() {
        return;
    }
    let mut s = setup("ports");
    for ip in ["127.77.0.7", "::1"] {
        // A plaintext server on another port of a provider address.
        let other = free_port(ip);
        let dest = SocketAddr::new(ip.parse().unwrap(), other);
        let real = TcpListener::bind(dest).unwrap();
        real.set_nonblocking(true).unwrap();
        let pid = run_client(&mut s.cgroup, &["tcp", &dest.to_string()]);
        let out = output(&mut s.cgroup, pid);
        assert_eq!(
            field(&out, "connect_error"),
            Some(libc::EPERM.to_string().as_str()),
            "{dest}: {out}"
        );
        assert!(real.accept().is_err(), "{dest}: the connection went direct");

        let pid = run_client(&mut s.cgroup, &["udp", &dest.to_string()]);
        let out = output(&mut s.cgroup, pid);
        let eperm = libc::EPERM.to_string();
        assert_eq!(
            field(&out, "udp_error"),
            Some(eperm.as_str()),
            "{dest}: {out}"
        );
        assert_eq!(
            field(&out, "udp_connect_error"),
            Some(eperm.as_str()),
            "{dest}: {out}"
        );
    }
}

#[test]
fn another_network_namespace_is_refused_before_any_exemption() {
    if skip() {
        return;
    }
    let mut s = setup("netns");
    // Inside its own network namespace the client listens on the provider
    // address itself: a connect let through would land there.
    let dest = format!("127.77.0.8:{}", s.port);
    let mark = OLD_GUARD_MARK.to_string();
    let script = format!("ip link set lo up && exec \"$0\" tcp {dest} --serve --mark {mark}");
    let pid = run_in(
        &mut s.cgroup,
        Command::new("unshare").args(["-n", "sh", "-c", &script, CLIENT]),
    );
    let out = output(&mut s.cgroup, pid);
    assert_eq!(field(&out, "marked"), Some(mark.as_str()), "{out}");
    assert_eq!(field(&out, "served"), Some("0"), "{out}");
    assert_eq!(
        field(&out, "connect_error"),
        Some(libc::EPERM.to_string().as_str()),
        "{out}"
    );
}

#[test]
fn a_stopped_gateway_means_refused_at_once_never_let_through() {
    if skip() {
        return;
    }
    let s = setup("closed");
    let dest: SocketAddr = format!("127.77.0.4:{}", s.port).parse().unwrap();
    let real = TcpListener::bind(dest).unwrap();
    real.set_nonblocking(true).unwrap();
    // The gateway stops accepting.
    let Setup {
        capture,
        listener4,
        listener6,
        cgroup,
        ..
    } = s;
    drop(listener4);
    drop(listener6);
    let mut cgroup = cgroup;
    let pid = run_client(&mut cgroup, &["tcp", &dest.to_string()]);
    let out = output(&mut cgroup, pid);
    assert_eq!(
        field(&out, "connect_error"),
        Some(libc::ECONNREFUSED.to_string().as_str()),
        "{out}"
    );
    assert!(
        real.accept().is_err(),
        "the connection leaked to its real destination"
    );
    drop(capture);
}

#[test]
fn dropping_the_capture_and_cgroup_detaches_and_removes_everything() {
    if skip() {
        return;
    }
    let s = setup("cleanup");
    let path = s.cgroup.path().to_path_buf();
    let Setup {
        capture, cgroup, ..
    } = s;
    drop(capture);
    drop(cgroup);
    assert!(
        !path.exists(),
        "test cgroup {} was left behind",
        path.display()
    );
}

/// A private bpffs on a temp dir (never the system's /sys/fs/bpf).
struct Bpffs(tempfile::TempDir);

impl Bpffs {
    fn mount() -> Bpffs {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a private bpffs failed (needs root)");
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn pinned_links_stay_fail_closed_without_the_process_and_are_replaced_without_a_gap() {
    if skip() {
        return;
    }
    let bpffs = Bpffs::mount();
    let pins = bpffs.0.path().join("kt");
    let mut s = setup("pinned");
    drop(s.capture);
    let dest: SocketAddr = format!("127.77.0.5:{}", s.port).parse().unwrap();
    let real = TcpListener::bind(dest).unwrap();
    real.set_nonblocking(true).unwrap();
    let cgroup_dir = s.cgroup.path().to_path_buf();
    let port = s.port;
    let spec = |listener: &TcpListener, keep: bool| CaptureSpec {
        cgroup: cgroup_dir.clone(),
        listen4: match listener.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        },
        listen6: None,
        prefixes: vec![IpPrefix {
            addr: "127.77.0.0".parse().unwrap(),
            len: 16,
        }],
        ports: vec![port],
        port_wide: false,
        own_ports: vec![],
        refuse_udp: true,
        refuse_other_netns: true,
        containers: None,
        pin_dir: Some(pins.clone()),
        keep_attached: keep,
    };

    // A first run keeps its links pinned and goes away (a crash or restart).
    let first = Capture::attach(&spec(&s.listener4, true)).unwrap();
    drop(first);
    drop(s.listener4);
    let pid = run_client(&mut s.cgroup, &["tcp", &dest.to_string()]);
    let out = output(&mut s.cgroup, pid);
    assert_eq!(
        field(&out, "connect_error"),
        Some(libc::ECONNREFUSED.to_string().as_str()),
        "with no kt running, pinned programs must still refuse: {out}"
    );
    assert!(real.accept().is_err(), "leaked to the real destination");

    // The next run takes over: its listener gets the connection.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let second = Capture::attach(&spec(&listener, false)).unwrap();
    let dirs: Vec<_> = std::fs::read_dir(&pins).unwrap().collect();
    assert_eq!(dirs.len(), 1, "stale pins were not replaced");
    let pid = run_client(&mut s.cgroup, &["tcp", &dest.to_string()]);
    let (stream, peer) = accept(&listener).expect("the new run did not capture");
    assert_eq!(second.take_origin(peer).map(|o| o.original), Some(dest));
    reply(stream, "second");
    assert_eq!(field(&output(&mut s.cgroup, pid), "reply"), Some("second"));

    // A clean stop detaches everything and removes its pins.
    drop(second);
    assert_eq!(
        std::fs::read_dir(&pins).unwrap().count(),
        0,
        "pins left behind"
    );
    real.set_nonblocking(false).unwrap();
    let pid = run_client(&mut s.cgroup, &["tcp", &dest.to_string()]);
    let (stream, _) = accept(&real).expect("after detach the connection should go direct");
    reply(stream, "direct");
    assert_eq!(field(&output(&mut s.cgroup, pid), "reply"), Some("direct"));
}

/// A new run takes over links a crashed run left pinned while a captured
/// client connects in a tight loop: every connection is refused (before) or
/// captured by the new run (after); none in between reaches the real
/// destination, which answers `direct:` to anything that gets there.
#[test]
fn a_new_run_takes_over_pinned_links_while_a_client_loops_and_none_goes_direct() {
    if skip() {
        return;
    }
    let bpffs = Bpffs::mount();
    let pins = bpffs.0.path().join("kt");
    let mut cgroup =
        TestCgroup::new("takeover").expect("creating a child cgroup (needs root and cgroup v2)");
    let port = free_port("127.77.0.6");
    let dest: SocketAddr = format!("127.77.0.6:{port}").parse().unwrap();
    let _real = Server::direct(dest);
    let dir = cgroup.path().to_path_buf();
    let spec = |listen4: std::net::SocketAddrV4, keep: bool| CaptureSpec {
        cgroup: dir.clone(),
        listen4,
        listen6: None,
        prefixes: vec![IpPrefix {
            addr: "127.77.0.0".parse().unwrap(),
            len: 16,
        }],
        ports: vec![port],
        port_wide: false,
        own_ports: vec![],
        refuse_udp: true,
        refuse_other_netns: true,
        containers: None,
        pin_dir: Some(pins.clone()),
        keep_attached: keep,
    };
    let v4 = |l: &TcpListener| match l.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };

    // The first run pins its links and dies; nothing listens any more.
    let first_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    drop(Capture::attach(&spec(v4(&first_listener), true)).unwrap());
    drop(first_listener);
    let mut looper = Looper::start(&mut cgroup, &[dest]);
    let mut conns = looper.settle(&[dest], 20);

    // The next run attaches while the client keeps connecting.
    looper.next_phase();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let second = std::sync::Arc::new(Capture::attach(&spec(v4(&listener), false)).unwrap());
    let origin = second.clone();
    let capture_server = Server::start(listener, move |peer| match origin.take_origin(peer) {
        Some(o) => captured_at(o.original),
        None => "captured:without-origin".into(),
    });
    looper.next_phase();
    conns.extend(looper.settle(&[dest], 20));
    conns.extend(looper.stop(&mut cgroup));

    let refused = format!("connect_error:{}", libc::ECONNREFUSED);
    for phase in 0..3 {
        let of: Vec<&Conn> = conns.iter().filter(|c| c.phase == phase).collect();
        eprintln!(
            "phase {phase}: {} connections, {} refused, {} captured",
            of.len(),
            of.iter().filter(|c| c.result == refused).count(),
            of.iter().filter(|c| c.result == captured_at(dest)).count()
        );
    }
    let odd: Vec<&Conn> = conns
        .iter()
        .filter(|c| c.result != refused && c.result != captured_at(dest))
        .collect();
    assert!(odd.is_empty(), "neither refused nor captured: {odd:?}");
    assert!(conns.iter().any(|c| c.phase == 0 && c.result == refused));
    assert!(
        conns
            .iter()
            .any(|c| c.phase == 2 && c.result == captured_at(dest))
    );
    assert!(
        conns
            .iter()
            .all(|c| c.phase < 2 || c.result == captured_at(dest)),
        "refused after the new run attached"
    );
    drop(capture_server);
    drop(second);
}

#[test]
fn port_wide_scope_captures_any_destination_on_the_port_and_says_which() {
    if skip() {
        return;
    }
    let own = free_port("127.0.0.1");
    let mut s = setup_with("portwide", |spec| {
        spec.port_wide = true;
        spec.ports.push(own);
        spec.own_ports = vec![own];
    });
    // Outside the provider prefixes, on the captured port: captured, and
    // the record says it was not a provider address.
    let other = format!("127.79.0.1:{}", s.port);
    let pid = run_client(&mut s.cgroup, &["tcp", &other]);
    let (stream, peer) = accept(&s.listener4).expect("non-provider destination not captured");
    let origin = s.capture.take_origin(peer).expect("no origin record");
    assert_eq!(origin.original, other.parse::<SocketAddr>().unwrap());
    assert!(!origin.provider_prefix);
    reply(stream, "wide-ok");
    let out = output(&mut s.cgroup, pid);
    assert_eq!(field(&out, "peer"), Some(other.as_str()), "{out}");

    // A provider address: captured as before, marked as one.
    let provider = format!("127.77.0.1:{}", s.port);
    let pid = run_client(&mut s.cgroup, &["tcp", &provider]);
    let (stream, peer) = accept(&s.listener4).expect("provider destination not captured");
    assert!(
        s.capture
            .take_origin(peer)
            .expect("no record")
            .provider_prefix
    );
    reply(stream, "provider-ok");
    output(&mut s.cgroup, pid);

    // kt's own loopback listener on a captured port is left alone.
    let own_listener = TcpListener::bind(("127.0.0.1", own)).unwrap();
    let pid = run_client(&mut s.cgroup, &["tcp", &format!("127.0.0.1:{own}")]);
    let (stream, _) = accept(&own_listener).expect("kt's own listener was not reached directly");
    reply(stream, "own-ok");
    assert_eq!(field(&output(&mut s.cgroup, pid), "reply"), Some("own-ok"));

    // Another port outside the prefixes: not kt's business.
    let direct = TcpListener::bind("127.79.0.2:0").unwrap();
    let dest = direct.local_addr().unwrap().to_string();
    let pid = run_client(&mut s.cgroup, &["tcp", &dest]);
    let (stream, _) = accept(&direct).expect("another port was not let through");
    reply(stream, "direct-ok");
    assert_eq!(
        field(&output(&mut s.cgroup, pid), "reply"),
        Some("direct-ok")
    );
}

#[test]
fn provider_scope_leaves_other_destinations_on_the_port_alone() {
    if skip() {
        return;
    }
    let mut s = setup("provscope");
    let direct = TcpListener::bind(("127.79.0.3", s.port)).unwrap();
    let dest = direct.local_addr().unwrap().to_string();
    let pid = run_client(&mut s.cgroup, &["tcp", &dest]);
    let (stream, _) = accept(&direct).expect("a non-provider destination was captured");
    reply(stream, "untouched");
    assert_eq!(
        field(&output(&mut s.cgroup, pid), "reply"),
        Some("untouched")
    );
}

/// A loopback server answering each connection's hello with a line made by
/// `answer` from the peer, until dropped.
struct Server {
    listener: TcpListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(
        listener: TcpListener,
        answer: impl Fn(SocketAddr) -> String + Send + 'static,
    ) -> Server {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let l = listener.try_clone().unwrap();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            loop {
                let (stream, peer) = match l.accept() {
                    Ok(c) => c,
                    Err(_) if s.load(Ordering::SeqCst) => return,
                    Err(_) => continue,
                };
                let _ = stream.set_read_timeout(Some(WAIT));
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_ok() && line == "hello\n" {
                    let _ = (&stream).write_all(format!("{}\n", answer(peer)).as_bytes());
                }
            }
        });
        Server {
            listener,
            stop,
            thread: Some(thread),
        }
    }

    /// A server on `addr` that stands for the real destination.
    fn direct(addr: SocketAddr) -> Server {
        Server::start(TcpListener::bind(addr).unwrap(), move |_| direct_at(addr))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the blocked accept (it fails with EINVAL).
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection of the looping client.
#[derive(Debug)]
struct Conn {
    /// How many retargets had returned when it began (at least).
    phase: u32,
    dest: SocketAddr,
    /// `captured:ORIGINAL`, `direct:ADDR`, `connect_error:ERRNO`, ...
    result: String,
}

/// A client in the test cgroup connecting to `dests` in a loop (see the
/// client's `loop` mode), and what it reported so far.
struct Looper {
    stdin: Option<std::process::ChildStdin>,
    conns: mpsc::Receiver<Conn>,
    pid: u32,
    phase: u32,
}

impl Looper {
    fn start(cgroup: &mut TestCgroup, dests: &[SocketAddr]) -> Looper {
        let mut child = Command::new(CLIENT)
            .arg("loop")
            .args(dests.iter().map(SocketAddr::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let pid = cgroup.adopt(child).unwrap();
        let (tx, conns) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Some(rest) = line.strip_prefix("conn ") else {
                    eprintln!("client: {line}");
                    continue;
                };
                let get = |k: &str| {
                    rest.split(' ')
                        .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                        .unwrap_or_default()
                        .to_string()
                };
                let conn = Conn {
                    phase: get("phase").parse().unwrap(),
                    dest: get("dest").parse().unwrap(),
                    result: get("result"),
                };
                if tx.send(conn).is_err() {
                    return;
                }
            }
        });
        stdin.write_all(b"go\n").unwrap();
        Looper {
            stdin: Some(stdin),
            conns,
            pid,
            phase: 0,
        }
    }

    /// Tells the client a retarget has returned: connections it begins
    /// from now on are in the next phase.
    fn next_phase(&mut self) {
        self.stdin.as_mut().unwrap().write_all(b"next\n").unwrap();
        self.phase += 1;
    }

    /// Reads connections until each destination has `n` that began in the
    /// current phase; returns every connection read.
    fn settle(&mut self, dests: &[SocketAddr], n: usize) -> Vec<Conn> {
        let mut read = Vec::new();
        while !dests.iter().all(|d| {
            read.iter()
                .filter(|c: &&Conn| c.dest == *d && c.phase == self.phase)
                .count()
                >= n
        }) {
            read.push(
                self.conns
                    .recv_timeout(WAIT)
                    .expect("the looping client stopped reporting"),
            );
        }
        read
    }

    /// Starts a new phase and calls `change` again and again until `n`
    /// connections to `dest` begun in that phase were read, so they were
    /// made while the maps were being changed; returns every connection
    /// read.
    fn during(&mut self, dest: SocketAddr, n: usize, mut change: impl FnMut()) -> Vec<Conn> {
        self.next_phase();
        let started = std::time::Instant::now();
        let mut read = Vec::new();
        loop {
            change();
            read.extend(self.conns.try_iter());
            let overlapping = read
                .iter()
                .filter(|c| c.dest == dest && c.phase == self.phase)
                .count();
            if overlapping >= n {
                return read;
            }
            assert!(
                started.elapsed() < WAIT,
                "the looping client stopped reporting"
            );
        }
    }

    /// Stops the client; returns the connections not read yet.
    fn stop(mut self, cgroup: &mut TestCgroup) -> Vec<Conn> {
        drop(self.stdin.take());
        let rest: Vec<Conn> = self.conns.iter().collect();
        cgroup.wait(self.pid).unwrap();
        rest
    }
}

fn captured_at(dest: SocketAddr) -> String {
    format!("captured:{dest}")
}

fn direct_at(dest: SocketAddr) -> String {
    format!("direct:{dest}")
}

/// Capture driven by a [`Supervisor`] (what kt runs), attached to the
/// test cgroup with its capture listener answering `captured:ORIGINAL`.
struct Supervised {
    rt: tokio::runtime::Runtime,
    sup: Supervisor<Capture>,
    capture_server: Server,
    cgroup: TestCgroup,
}

fn supervised(label: &str, targets: Targets) -> Supervised {
    let cgroup =
        TestCgroup::new(label).expect("creating a child cgroup (needs root and cgroup v2)");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let SocketAddr::V4(l4) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ports = targets.ports.clone();
    let dir = cgroup.path().to_path_buf();
    let sup = rt
        .block_on(Supervisor::start(targets, |prefixes| {
            Capture::attach(&CaptureSpec {
                cgroup: dir,
                listen4: l4,
                listen6: None,
                prefixes,
                ports,
                port_wide: false,
                own_ports: vec![],
                refuse_udp: true,
                refuse_other_netns: true,
                containers: None,
                pin_dir: None,
                keep_attached: false,
            })
        }))
        .expect("attaching the capture programs to a child cgroup");
    let capture = sup.programs().clone();
    let capture_server = Server::start(listener, move |peer| match capture.take_origin(peer) {
        Some(o) => captured_at(o.original),
        None => "captured:without-origin".into(),
    });
    Supervised {
        rt,
        sup,
        capture_server,
        cgroup,
    }
}

impl Supervised {
    fn retarget(&self, targets: Targets) -> Retargeted {
        self.rt
            .block_on(self.sup.retarget(targets))
            .expect("retarget")
    }

    /// Detaches (the capture listener's handle on the programs goes first).
    fn finish(self) {
        let Supervised {
            rt,
            sup,
            capture_server,
            cgroup,
        } = self;
        drop(capture_server);
        assert!(rt.block_on(sup.detach()), "capture still referenced");
        drop(cgroup);
    }
}

fn host(addr: SocketAddr) -> IpPrefix {
    guard::capture::prefix_of(addr.ip())
}

#[test]
fn prefixes_changed_in_place_while_a_client_loops_none_kept_goes_direct_or_is_refused() {
    if skip() {
        return;
    }
    let port = free_port("127.77.1.1");
    let [a, b, c]: [SocketAddr; 3] = ["127.77.1.1", "127.77.1.2", "127.77.1.3"]
        .map(|ip| SocketAddr::new(ip.parse().unwrap(), port));
    let servers: Vec<Server> = [a, b, c].into_iter().map(Server::direct).collect();
    let targets = |cidrs: [SocketAddr; 2]| Targets {
        hosts: vec![],
        static_prefixes: cidrs.into_iter().map(host).collect(),
        ports: vec![port],
    };
    let mut s = supervised("retarget-prefixes", targets([a, b]));
    let dests = [a, b, c];
    let mut looper = Looper::start(&mut s.cgroup, &dests);
    let mut all = Vec::new();

    // Before any change: A and B captured, C direct.
    let before = looper.settle(&dests, 2);
    for conn in &before {
        let want = if conn.dest == c {
            direct_at(c)
        } else {
            captured_at(conn.dest)
        };
        assert_eq!(conn.result, want, "before the retarget: {conn:?}");
    }
    all.extend(before);

    // Between {A, B} and {B, C}: first many times over while the client
    // loops, then once more and let it settle.
    for round in 1..=4u32 {
        let (now, gone) = if round % 2 == 1 { (c, a) } else { (a, c) };
        let mut there = false;
        all.extend(looper.during(b, 60, || {
            let (to, from) = if there { (gone, now) } else { (now, gone) };
            let change = s.retarget(targets([b, to]));
            assert_eq!(change.prefixes_added, vec![host(to)], "{change:?}");
            assert_eq!(change.prefixes_removed, vec![host(from)], "{change:?}");
            assert!(change.ports_added.is_empty() && change.ports_removed.is_empty());
            there = !there;
        }));
        if !there {
            s.retarget(targets([b, now]));
        }
        looper.next_phase();
        let read = looper.settle(&dests, 2);
        // Connections begun after the last retarget returned (and read
        // before the next one starts) see exactly the new set.
        for conn in read.iter().filter(|conn| conn.phase == looper.phase) {
            let want = if conn.dest == gone {
                direct_at(gone)
            } else {
                captured_at(conn.dest)
            };
            assert_eq!(conn.result, want, "after round {round}: {conn:?}");
        }
        all.extend(read);
    }
    all.extend(looper.stop(&mut s.cgroup));

    // B stayed in the set throughout: every connection to it was captured,
    // also those made while the maps were being changed.
    let to_b: Vec<&Conn> = all.iter().filter(|conn| conn.dest == b).collect();
    assert!(to_b.len() >= 80, "{} connections to B", to_b.len());
    for conn in to_b {
        assert_eq!(conn.result, captured_at(b), "{conn:?}");
    }
    drop(servers);
    s.finish();
}

#[test]
fn ports_changed_in_place_while_a_client_loops_none_kept_goes_direct_or_is_refused() {
    if skip() {
        return;
    }
    let ip: std::net::IpAddr = "127.77.2.1".parse().unwrap();
    let [(d1, s1), (d2, s2)] = [(); 2].map(|()| {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        (addr, Server::start(l, move |_| direct_at(addr)))
    });
    let (p1, p2) = (d1.port(), d2.port());
    let servers = [s1, s2];
    let targets = |ports: &[u16]| Targets {
        hosts: vec![],
        static_prefixes: vec![guard::capture::prefix_of(ip)],
        ports: ports.to_vec(),
    };
    let refused = format!("connect_error:{}", libc::EPERM);
    let mut s = supervised("retarget-ports", targets(&[p1]));
    let dests = [d1, d2];
    let mut looper = Looper::start(&mut s.cgroup, &dests);

    // Port 1 captured; another port of a captured prefix is refused.
    let mut first = looper.settle(&dests, 2);
    for conn in &first {
        let want = if conn.dest == d1 {
            captured_at(d1)
        } else {
            refused.clone()
        };
        assert_eq!(conn.result, want, "before: {conn:?}");
    }

    // Add port 2, many times over while the client loops (and removing it
    // again in between), then let it settle: both captured.
    let mut there = false;
    first.extend(looper.during(d1, 60, || {
        let change = if there {
            s.retarget(targets(&[p1]))
        } else {
            s.retarget(targets(&[p1, p2]))
        };
        let flipped = (vec![p2], vec![]);
        let (added, removed) = (change.ports_added, change.ports_removed);
        if there {
            assert_eq!((removed, added), flipped);
        } else {
            assert_eq!((added, removed), flipped);
        }
        assert!(change.prefixes_added.is_empty() && change.prefixes_removed.is_empty());
        there = !there;
    }));
    if !there {
        s.retarget(targets(&[p1, p2]));
    }
    looper.next_phase();
    let both = looper.phase;
    let added = looper.settle(&dests, 2);
    for conn in added.iter().filter(|c| c.phase == both) {
        assert_eq!(
            conn.result,
            captured_at(conn.dest),
            "after adding: {conn:?}"
        );
    }
    first.extend(added);
    // Port 1 was kept: captured in every connection read up to now,
    // including those made while port 2 came and went.
    let kept: Vec<&Conn> = first.iter().filter(|c| c.dest == d1).collect();
    assert!(kept.len() >= 20, "{} connections to port 1", kept.len());
    for conn in kept {
        assert_eq!(conn.result, captured_at(d1), "{conn:?}");
    }

    // Remove port 1 the same way: refused from then on, port 2 kept.
    let mut there = false;
    let mut rest = looper.during(d2, 60, || {
        let change = if there {
            s.retarget(targets(&[p1, p2]))
        } else {
            s.retarget(targets(&[p2]))
        };
        let flipped = (vec![], vec![p1]);
        let (added, removed) = (change.ports_added, change.ports_removed);
        if there {
            assert_eq!((removed, added), flipped);
        } else {
            assert_eq!((added, removed), flipped);
        }
        there = !there;
    });
    if !there {
        s.retarget(targets(&[p2]));
    }
    looper.next_phase();
    let only_2 = looper.phase;
    let removed = looper.settle(&dests, 2);
    for conn in removed.iter().filter(|c| c.phase == only_2) {
        let want = if conn.dest == d1 {
            refused.clone()
        } else {
            captured_at(d2)
        };
        assert_eq!(conn.result, want, "after removing: {conn:?}");
    }
    rest.extend(removed);
    rest.extend(looper.stop(&mut s.cgroup));
    // Port 2 was kept since it settled in: captured throughout the removals.
    let kept: Vec<&Conn> = first
        .iter()
        .chain(&rest)
        .filter(|c| c.dest == d2 && c.phase >= both)
        .collect();
    assert!(kept.len() >= 20, "{} connections to port 2", kept.len());
    for conn in kept {
        assert_eq!(conn.result, captured_at(d2), "{conn:?}");
    }
    drop(servers);
    s.finish();
}
