//! `kt run` end to end, as root, in a child cgroup: a "legacy" curl with a
//! hard-coded old key talks to `api.openai.com` (resolved by curl itself to
//! a loopback address in the capture prefixes), the kernel sends it to the
//! gateway, the fake provider sees only the managed new key, and the event
//! names the process and the old secret its key matched. Other tests try
//! to walk around capture (the old guard mark, another port, kt killed) and
//! check the fake provider never sees the process's key.
//!
//! Only loopback: the fake providers listen on 127.77.N.x:443; no name is
//! redirected for anyone but the clients in the test cgroup (`--resolve`).
//! kt runs inside the test cgroup too (its own upstream sockets must pass
//! by their registered cookies) and in a private mount namespace, where it
//! mounts its own bpffs (never on the host).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use guard_tests::cgroup::TestCgroup;
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::mountns::PrivateMounts;
use guard_tests::process::{RunGuard, wait_for_log};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const CLIENT: &str = env!("CARGO_BIN_EXE_kt-test-client");
const Q2: &str = "sk-runtest-new-q2-TUFOQUdFRF9ORVdfS0VZXzIwMjZRMg";
/// Not key-shaped on purpose (no known prefix, one case): capture's argv
/// masking does not recognise it, so only the gateway's exact redaction
/// keeps it out of the recorded command line.
const Q1: &str = "legacy-q1-token-4f1c9e2a77d0b3";
/// The mark older kt versions exempted from capture.
const OLD_GUARD_MARK: u32 = 0x6b74_0001;

fn skip() -> bool {
    guard_tests::ebpf_tests_off("run")
}

fn free_port() -> u16 {
    guard_tests::process::free_addr().port()
}

fn kt(data: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    guard_tests::kt_run::kt_cmd(KT, data, args, stdin)
}

/// The capture listener ports: chosen free ones, or kt's defaults.
#[derive(Clone, Copy, PartialEq)]
enum Listen {
    Free,
    Default,
}

fn config(
    dir: &Path,
    q2: &FakeProvider,
    q1: &FakeProvider,
    listen: Listen,
    scope: &str,
) -> PathBuf {
    let capture = match listen {
        Listen::Free => format!(
            "  capture_listen: 127.0.0.1:{}\n  capture_listen6: \"[::1]:{}\"\n",
            free_port(),
            free_port()
        ),
        Listen::Default => String::new(),
    };
    let yaml = format!(
        r#"pack:
  name: run-test
  version: "1.0.0"
  enabled: true
providers:
  routing:
    strategy: ordered
  fallback:
    enabled: true
  targets:
    - id: openai-2026q2
      provider: openai
      required: true
      base_url: {q2}
      secret_key_ref:
        store: OPENAI_API_KEY_2026Q2
    - id: openai-2026q1
      provider: openai
      required: false
      base_url: {q1}
      secret_key_ref:
        store: OPENAI_API_KEY_2026Q1
policies:
  chain:
    - audit-logger
gateway:
  listen: 127.0.0.1:{p1}
{capture}capture:
  hosts: []
  cidrs: [127.77.0.0/16]
  ports: [443]
  scope: {scope}
"#,
        q2 = q2.openai_base_url(),
        q1 = q1.openai_base_url(),
        p1 = free_port(),
    );
    let path = dir.join("kt.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A running `kt run` over a test cgroup, with two fake providers on
/// `127.77.<net>.10` (primary) and `.11`. Field order is drop order: kt
/// ends before its cgroup is removed and before its mount namespace goes.
struct Scenario {
    kt: RunGuard,
    /// Arguments of `setpriv` to start kt under (none: kt directly).
    setpriv: Vec<String>,
    cgroup: TestCgroup,
    mounts: PrivateMounts,
    q2: FakeProvider,
    q1: FakeProvider,
    provider: String,
    data: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
    ca_pem: PathBuf,
    upstream_ca: TestCa,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Scenario {
    fn start(label: &str, net: u8, listen: Listen) -> Scenario {
        Scenario::start_scoped(label, net, listen, "provider")
    }

    /// As [`Scenario::start`] with `capture.scope` set to `scope`.
    fn start_scoped(label: &str, net: u8, listen: Listen, scope: &str) -> Scenario {
        Scenario::start_full(label, net, listen, scope, Vec::new())
    }

    /// As [`Scenario::start`], kt started through `setpriv WRAP... kt`.
    fn start_full(
        label: &str,
        net: u8,
        listen: Listen,
        scope: &str,
        setpriv: Vec<String>,
    ) -> Scenario {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ca = TestCa::new();
        let provider = format!("127.77.{net}.10");
        let q2 = rt.block_on(FakeProvider::start_at(
            &ca,
            "fake-q2",
            Behavior::Ok,
            format!("{provider}:443").parse().unwrap(),
        ));
        let q1 = rt.block_on(FakeProvider::start_at(
            &ca,
            "fake-q1",
            Behavior::Ok,
            format!("127.77.{net}.11:443").parse().unwrap(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        for (name, value) in [("OPENAI_API_KEY_2026Q2", Q2), ("OPENAI_API_KEY_2026Q1", Q1)] {
            let out = kt(&data, &["secrets", "add", name, "--store"], Some(value));
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cfg = config(dir.path(), &q2, &q1, listen, scope);
        let ca_pem = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca_pem, &ca.pem).unwrap();
        let mounts = PrivateMounts::new().expect("a private mount namespace (needs root)");
        let cgroup = TestCgroup::new(label).expect("child cgroup (needs root and cgroup v2)");
        let log = dir.path().join(format!("kt-{label}.log"));
        let mut s = Scenario {
            kt: RunGuard(None),
            setpriv,
            cgroup,
            mounts,
            q2,
            q1,
            provider,
            data,
            cfg,
            log,
            ca_pem,
            upstream_ca: ca,
            rt,
            _dir: dir,
        };
        s.run_kt();
        s
    }

    /// Starts `kt run` (again) in the namespace, in the cgroup, and waits
    /// until it captures.
    fn run_kt(&mut self) {
        let _ = std::fs::remove_file(&self.log);
        let mut command = if self.setpriv.is_empty() {
            self.mounts.command(KT)
        } else {
            let mut c = self.mounts.command("setpriv");
            c.args(&self.setpriv).arg("--").arg(KT);
            c
        };
        let child = command
            .args(["run", "--config", self.cfg.to_str().unwrap(), "--cgroup"])
            .arg(self.cgroup.path())
            .env("KT_DATA_DIR", &self.data)
            .env("SSL_CERT_FILE", &self.ca_pem)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.kt = RunGuard(Some(child));
        self.cgroup.enter(pid).unwrap();
        wait_for_log(&self.log, "kt: capturing");
    }

    fn kt_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: kt gets no chance to detach anything.
    fn kill_kt(&mut self) {
        let mut child = self.kt.0.take().unwrap();
        child.kill().unwrap();
        let _ = child.wait();
    }

    /// curl in the cgroup with the process's own (old) key, as a legacy job:
    /// `--resolve` sends `api.openai.com` to the primary fake. Returns the
    /// exit status, stdout, stderr and pid.
    fn curl(&mut self, url: &str, port: u16) -> (std::process::ExitStatus, String, String, u32) {
        let provider = self.provider.clone();
        self.curl_at(url, port, &provider)
    }

    /// As [`Scenario::curl`], `api.openai.com` resolved to `addr`.
    fn curl_at(
        &mut self,
        url: &str,
        port: u16,
        addr: &str,
    ) -> (std::process::ExitStatus, String, String, u32) {
        let kt_ca = self.data.join("ca/ca.pem");
        let script = format!(
            r#"read go; exec curl -sS --max-time 20 --resolve api.openai.com:{port}:{addr} --cacert "$KT_CA" -H "Authorization: Bearer $OLD_KEY" -H 'content-type: application/json' -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}]}}' {url}"#
        );
        let mut job = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("KT_CA", &kt_ca)
            .env("OLD_KEY", Q1)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut go = job.stdin.take().unwrap();
        let mut stdout = job.stdout.take().unwrap();
        let mut stderr = job.stderr.take().unwrap();
        let pid = self.cgroup.adopt(job).unwrap();
        go.write_all(b"go\n").unwrap();
        drop(go);
        let mut body = String::new();
        stdout.read_to_string(&mut body).unwrap();
        let mut err = String::new();
        stderr.read_to_string(&mut err).unwrap();
        let status = self.cgroup.wait(pid).unwrap().status;
        (status, body, err, pid)
    }

    /// curl in the cgroup to `https://{name}/` at `addr:443`, trusting only
    /// the upstream test CA (not kt's). Returns the exit status, curl's
    /// local port (what a server reached directly sees as its peer), and
    /// stderr.
    fn curl_site(&mut self, name: &str, addr: &str) -> (std::process::ExitStatus, u16, String) {
        let script = format!(
            r#"read go; exec curl -sS -o /dev/null -w '%{{local_port}}' --max-time 20 --resolve {name}:443:{addr} --cacert "$UPSTREAM_CA" -H 'x-probe: {name}' https://{name}/"#
        );
        let mut job = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("UPSTREAM_CA", &self.ca_pem)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut go = job.stdin.take().unwrap();
        let mut stdout = job.stdout.take().unwrap();
        let mut stderr = job.stderr.take().unwrap();
        let pid = self.cgroup.adopt(job).unwrap();
        go.write_all(b"go\n").unwrap();
        drop(go);
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        let mut err = String::new();
        stderr.read_to_string(&mut err).unwrap();
        let status = self.cgroup.wait(pid).unwrap().status;
        (status, out.trim().parse().unwrap_or(0), err)
    }

    /// The events kt recorded, one JSON line each.
    fn events(&self) -> String {
        let out = kt(&self.data, &["--output", "json", "events"], None);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Neither fake provider ever saw the process's own key.
    fn assert_key_never_reached_a_provider(&self) {
        for r in self.q2.requests().iter().chain(self.q1.requests().iter()) {
            assert!(
                !format!("{:?} {:?}", r.headers, r.path).contains(Q1),
                "the process's own key reached a provider: {r:?}"
            );
        }
    }
}

/// curl's exit code for "could not connect".
const CURL_COULDNT_CONNECT: i32 = 7;

#[test]
fn kt_run_swaps_a_legacy_process_key_and_names_the_process() {
    if skip() {
        return;
    }
    let mut s = Scenario::start("run", 0, Listen::Free);
    let (status, body, err, pid) = s.curl("https://api.openai.com/v1/chat/completions", 443);
    assert!(
        status.success(),
        "curl failed: {err}\nkt log:\n{}",
        s.kt_log()
    );
    assert!(
        body.contains("fake-q2"),
        "answer did not come from the primary: {body}"
    );

    // The provider saw the managed new key, never the process's own.
    let seen = s.q2.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let auth = seen[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(auth, format!("Bearer {Q2}"));
    assert!(
        seen.iter()
            .all(|r| !format!("{:?}", r.headers).contains(Q1))
    );
    assert!(s.q1.requests().is_empty());

    // Dialling the capture port directly (no capture record) is closed,
    // never served or spliced back into the listener.
    let capture_port = capture_port(&s.kt_log());
    let mut direct = std::net::TcpStream::connect(("127.0.0.1", capture_port)).unwrap();
    direct
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = direct.write_all(b"GET / HTTP/1.1\r\nhost: api.openai.com\r\n\r\n");
    let mut buf = [0u8; 64];
    assert!(
        matches!(direct.read(&mut buf), Ok(0) | Err(_)),
        "unrecorded connection was served"
    );

    // SIGTERM: clean exit, programs detached.
    let mut child = s.kt.0.take().unwrap();
    // By pid, the child we started.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = child.wait().unwrap();
    let text = s.kt_log();
    assert_eq!(exit.code(), Some(0), "{text}");
    assert!(text.contains("capture detached"), "{text}");
    assert!(
        !text.contains(Q1) && !text.contains(Q2),
        "a key reached the log:\n{text}"
    );

    // The event names the process and the old secret its key matched.
    let events = kt(&s.data, &["--output", "json", "events"], None);
    let out = String::from_utf8_lossy(&events.stdout).to_string();
    let line = out
        .lines()
        .find(|l| l.contains("chat/completions"))
        .unwrap_or_else(|| panic!("no event: {out}"));
    let e: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(e["client"]["pid"], pid, "{e}");
    assert!(
        e["client"]["exe"].as_str().unwrap_or("").ends_with("curl"),
        "{e}"
    );
    assert_eq!(e["key"]["matches_secret"], "OPENAI_API_KEY_2026Q1", "{e}");
    assert_eq!(e["target_chosen"], "openai-2026q2", "{e}");
    assert_eq!(e["decision"], "allow", "{e}");
    assert!(!out.contains(Q1) && !out.contains(Q2));
    // curl had the key in its argv; the event keeps the shape, not the key.
    assert!(
        e["client"]["cmdline"]
            .as_str()
            .unwrap_or("")
            .contains("Bearer [redacted]"),
        "{e}"
    );

    // The rotation question: who still uses the Q1 key?
    let keys = kt(&s.data, &["events", "--keys"], None);
    let report = String::from_utf8_lossy(&keys.stdout);
    assert!(
        report.contains("OPENAI_API_KEY_2026Q1") && report.contains("curl"),
        "{report}"
    );
}

/// The capability bound of the systemd unit (`kt service unit`, what the
/// .deb and `kt service install` ship) is enough for `kt run`: under
/// exactly that bounding set and no_new_privs, capture attaches, and a
/// legacy process's request is captured and sent with the managed key.
/// (The unit's file-system sandboxing is systemd's and is not applied here.)
#[test]
fn kt_run_works_within_the_units_capability_bound() {
    if skip() {
        return;
    }
    let unit = Command::new(KT).args(["service", "unit"]).output().unwrap();
    let unit = String::from_utf8(unit.stdout).unwrap();
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("no capability bound in the unit:\n{unit}"));
    let bound: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let setpriv = vec![
        "--bounding-set".to_string(),
        format!("-all,{}", bound.join(",")),
        "--no-new-privs".to_string(),
    ];
    let mut s = Scenario::start_full("unitcaps", 10, Listen::Free, "provider", setpriv);
    let (status, body, err, _) = s.curl("https://api.openai.com/v1/chat/completions", 443);
    assert!(
        status.success(),
        "curl failed: {err}\nkt log:\n{}",
        s.kt_log()
    );
    assert!(body.contains("fake-q2"), "{body}");
    let seen = s.q2.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        &format!("Bearer {Q2}")
    );
}

/// The IPv4 capture listener port, from kt's "capturing" line.
fn capture_port(log: &str) -> u16 {
    log.split("(capture listener ")
        .nth(1)
        .and_then(|rest| rest.split([',', ')']).next())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map_or_else(
            || panic!("no capture listener in kt's log:\n{log}"),
            |a| a.port(),
        )
}

/// Runs the test client (outside the cgroup), lets it go, returns stdout.
fn client(command: &mut Command) -> String {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn a_cap_net_raw_process_setting_the_old_guard_mark_is_still_captured() {
    if skip() {
        return;
    }
    let mut s = Scenario::start("oldmark", 1, Listen::Free);
    // User nobody with CAP_NET_RAW only (a default container has it; since
    // Linux 5.17 it may set SO_MARK), the old mark on its socket.
    let mark = OLD_GUARD_MARK.to_string();
    let dest = format!("{}:443", s.provider);
    let mut job = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+net_raw",
            "--ambient-caps=-all,+net_raw",
            "--bounding-set=-all,+net_raw",
            "--",
            CLIENT,
            "https",
            &dest,
            "--sni",
            "api.openai.com",
            "--mark",
            &mark,
        ])
        .env("KT_CLIENT_KEY", Q1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut go = job.stdin.take().unwrap();
    let pid = s.cgroup.adopt(job).unwrap();
    go.write_all(b"go\n").unwrap();
    drop(go);
    let out = String::from_utf8_lossy(&s.cgroup.wait(pid).unwrap().stdout).into_owned();
    assert_eq!(field(&out, "marked"), Some(mark.as_str()), "{out}");
    s.assert_key_never_reached_a_provider();
    // Captured: kt answered with the managed key's provider.
    assert_eq!(field(&out, "status"), Some("200"), "{out}\n{}", s.kt_log());
    assert!(
        field(&out, "body").is_some_and(|b| b.contains("fake-q2")),
        "{out}"
    );
    let seen = s.q2.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0]
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some(format!("Bearer {Q2}").as_str())
    );
}

#[test]
fn plaintext_port_80_of_a_provider_address_is_refused() {
    if skip() {
        return;
    }
    let mut s = Scenario::start("port80", 2, Listen::Free);
    let plain = std::net::TcpListener::bind(format!("{}:80", s.provider)).unwrap();
    plain.set_nonblocking(true).unwrap();
    let (status, _, err, _) = s.curl("http://api.openai.com/v1/chat/completions", 80);
    assert_eq!(status.code(), Some(CURL_COULDNT_CONNECT), "{err}");
    // A connection let through would be queued on the listener by now.
    assert!(
        plain.accept().is_err(),
        "the plaintext request went to the provider address"
    );
    s.assert_key_never_reached_a_provider();
    assert!(s.q2.requests().is_empty());
}

#[test]
fn while_kt_is_down_no_unprivileged_process_can_take_the_capture_port() {
    if skip() {
        return;
    }
    // kt's default capture listeners.
    let mut s = Scenario::start("squat", 3, Listen::Default);
    let port = capture_port(&s.kt_log());
    assert!(
        port < 1024,
        "the default capture port {port} needs no privilege"
    );
    s.kill_kt();
    // Pinned programs still send provider connections to that port.
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let out = client(Command::new("setpriv").args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            CLIENT,
            "bind",
            &addr,
        ]));
        assert_eq!(
            field(&out, "bind_error"),
            Some(libc::EACCES.to_string().as_str()),
            "user nobody could bind {addr} while kt was down: {out}"
        );
    }
    let (status, _, err, _) = s.curl("https://api.openai.com/v1/chat/completions", 443);
    assert_eq!(status.code(), Some(CURL_COULDNT_CONNECT), "{err}");
    s.assert_key_never_reached_a_provider();
    assert!(s.q2.requests().is_empty() && s.q1.requests().is_empty());
}

#[test]
fn sigkill_with_no_bpffs_mounted_beforehand_leaves_capture_refusing() {
    if skip() {
        return;
    }
    let mut s = Scenario::start("nobpffs", 4, Listen::Free);
    // kt found no bpffs in its namespace (the fixture unmounted any) and
    // mounted one to pin its links.
    assert_eq!(
        s.mounts.bpffs_mounts(),
        vec![PathBuf::from(guard::capture::BPFFS_DEFAULT)],
        "{}",
        s.kt_log()
    );
    s.kill_kt();
    let (status, _, err, _) = s.curl("https://api.openai.com/v1/chat/completions", 443);
    assert_eq!(
        status.code(),
        Some(CURL_COULDNT_CONNECT),
        "with kt killed, capture must refuse: {err}"
    );
    s.assert_key_never_reached_a_provider();
    assert!(s.q2.requests().is_empty() && s.q1.requests().is_empty());

    // The next run takes over the pinned links and serves again.
    s.run_kt();
    let (status, body, err, _) = s.curl("https://api.openai.com/v1/chat/completions", 443);
    assert!(status.success(), "{err}\n{}", s.kt_log());
    assert!(body.contains("fake-q2"), "{body}");
    s.assert_key_never_reached_a_provider();
}

/// Class 1 (splice paths): another TLS name on a provider address, the way
/// a job that pins its own name or resolver would reach it, is refused by
/// kt with an alert and recorded; it is never passed on to the address,
/// even to a client that skips certificate checks.
#[test]
fn another_name_on_a_provider_address_is_refused_not_spliced() {
    if skip() {
        return;
    }
    let mut s = Scenario::start("othername", 6, Listen::Free);
    let script = format!(
        r#"read go; exec curl -sSk --max-time 20 --resolve www.example.com:443:{p} -H "Authorization: Bearer $OLD_KEY" -d '{{}}' https://www.example.com/v1/chat/completions"#,
        p = s.provider
    );
    let mut job = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("OLD_KEY", Q1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut go = job.stdin.take().unwrap();
    let mut stderr = job.stderr.take().unwrap();
    let pid = s.cgroup.adopt(job).unwrap();
    go.write_all(b"go\n").unwrap();
    drop(go);
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    let status = s.cgroup.wait(pid).unwrap().status;
    assert!(!status.success(), "the connection went through: {err}");
    assert!(
        s.q2.requests().is_empty(),
        "the provider address was reached"
    );
    s.assert_key_never_reached_a_provider();
    // The refusal is an event naming the rule (SIGTERM: kt writes its
    // last events before it exits).
    let mut child = s.kt.0.take().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let out = kt(&s.data, &["events", "--output", "json"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("non-provider-name") && text.contains("www.example.com"),
        "no refusal event: {text}"
    );
}

/// A non-provider HTTPS server on the capture port, outside the provider
/// prefixes, with its own certificate for `site.kt-test`.
fn site(s: &Scenario, net: u8) -> FakeProvider {
    s.rt.block_on(FakeProvider::start_named(
        &s.upstream_ca,
        "site",
        Behavior::Ok,
        format!("127.78.{net}.20:443").parse().unwrap(),
        &["site.kt-test"],
    ))
}

#[test]
fn port_wide_capture_splices_a_non_provider_site_and_records_it() {
    if skip() {
        return;
    }
    let mut s = Scenario::start_scoped("portwide", 5, Listen::Free, "port");
    let site = site(&s, 5);
    let addr = site.addr.ip().to_string();
    let (status, local_port, err) = s.curl_site("site.kt-test", &addr);
    // curl trusted only the site's own CA: kt did not terminate it.
    assert!(
        status.success(),
        "curl failed: {err}\nkt log:\n{}",
        s.kt_log()
    );
    let seen = site.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].headers.get("x-probe").and_then(|v| v.to_str().ok()),
        Some("site.kt-test")
    );
    // The site's peer is kt's socket, not curl's: capture took it.
    assert_ne!(
        seen[0].peer.port(),
        local_port,
        "the connection went direct"
    );
    let events = s.events();
    let line = events
        .lines()
        .find(|l| l.contains("spliced-non-provider"))
        .unwrap_or_else(|| panic!("no splice event: {events}\nkt log:\n{}", s.kt_log()));
    assert!(line.contains("site.kt-test:443"), "{line}");
    assert!(line.contains(&addr), "{line}");
    let e: serde_json::Value = serde_json::from_str(line).unwrap();
    assert!(
        e["client"]["exe"].as_str().unwrap_or("").ends_with("curl"),
        "{e}"
    );

    // A provider name still gets the managed key.
    let (status, body, err, _) = s.curl("https://api.openai.com/v1/chat/completions", 443);
    assert!(status.success(), "{err}\n{}", s.kt_log());
    assert!(body.contains("fake-q2"), "{body}");
    let auth: Vec<_> =
        s.q2.requests()
            .iter()
            .map(|r| r.headers.get("authorization").cloned())
            .collect();
    assert_eq!(auth.len(), 1);
    assert_eq!(
        auth[0].as_ref().and_then(|v| v.to_str().ok()),
        Some(format!("Bearer {Q2}").as_str())
    );

    // A non-provider name on a provider address is still refused.
    let provider = s.provider.clone();
    let (status, _, err) = s.curl_site("site.kt-test", &provider);
    assert!(!status.success(), "{err}");
    assert_eq!(s.q2.requests().len(), 1);
    s.assert_key_never_reached_a_provider();
    drop(site);
}

#[test]
fn provider_scope_leaves_a_non_provider_site_alone() {
    if skip() {
        return;
    }
    let mut s = Scenario::start_scoped("provscope", 6, Listen::Free, "provider");
    let site = site(&s, 6);
    let addr = site.addr.ip().to_string();
    let (status, local_port, err) = s.curl_site("site.kt-test", &addr);
    assert!(
        status.success(),
        "curl failed: {err}\nkt log:\n{}",
        s.kt_log()
    );
    let seen = site.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    // Direct: the site's peer is curl's own socket.
    assert_eq!(seen[0].peer.port(), local_port);
    let events = s.events();
    assert!(
        !events.contains("site.kt-test") && !events.contains(&addr),
        "kt saw a connection it should not have: {events}"
    );
    drop(site);
}

/// `kt gateway reload` with new `capture.cidrs`: the running programs are
/// retargeted in place (kt is not restarted, capture never detaches): an
/// address added is captured from then on, the provider's own address
/// stays captured, and the reload event says what moved.
#[test]
fn a_reload_moves_capture_prefixes_in_place() {
    if skip() {
        return;
    }
    let mut s = Scenario::start("reload", 9, Listen::Free);
    let url = "https://api.openai.com/v1/chat/completions";
    let edge = "127.79.9.10";
    // Not captured yet: nothing listens there, so the job cannot connect.
    let (status, _, _, _) = s.curl_at(url, 443, edge);
    assert_eq!(status.code(), Some(CURL_COULDNT_CONNECT));

    let cfg = std::fs::read_to_string(&s.cfg).unwrap();
    let moved = cfg.replace(
        "cidrs: [127.77.0.0/16]",
        &format!("cidrs: [{}/32, 127.79.9.0/24]", s.provider),
    );
    assert_ne!(cfg, moved);
    std::fs::write(&s.cfg, moved).unwrap();
    let out = kt(&s.data, &["gateway", "reload"], None);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}\nkt log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.kt_log()
    );
    assert!(
        said.contains("capture:") && said.contains("127.79.9.0/24"),
        "{said}"
    );

    // Now captured: the job reaches the primary through kt, with the
    // managed key; the provider's own address is still captured.
    for addr in [edge.to_string(), s.provider.clone()] {
        let (status, body, err, _) = s.curl_at(url, 443, &addr);
        assert!(status.success(), "{addr}: {err}\nkt log:\n{}", s.kt_log());
        assert!(body.contains("fake-q2"), "{addr}: {body}");
    }
    assert!(s.q2.requests().iter().all(|r| {
        r.headers
            .get("authorization")
            .is_some_and(|v| v == &format!("Bearer {Q2}"))
    }));
    s.assert_key_never_reached_a_provider();
    assert!(
        !s.kt_log().contains("capture detached"),
        "kt restarted capture"
    );
    let events = s.events();
    assert!(
        events.contains("\"rule_id\":\"reload\"") && events.contains("127.79.9.0/24"),
        "{events}"
    );
}
