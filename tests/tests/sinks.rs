//! Event sinks of a real `kt gateway run` (fake TLS providers): a real
//! rsyslogd started by the test receives every event over UDP and TCP; the
//! file sink rotates under load and after a logrotate-style move (SIGUSR1)
//! without losing or duplicating an event; the stdout sink prints them; a
//! sink that is down refuses requests (`on_failure: refuse`) or only counts
//! what it missed (`on_failure: log`).

use std::collections::HashMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::{chat_body, h1_plain, post, send};
use guard_tests::process::free_addr;

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const KEY: &str = "sk-sinks-managed-U0lOS1NfS0VZXzAx";

/// A child process of this test, killed (by its pid) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM (kt writes what is queued, then exits) and waits.
    fn stop(mut self) {
        signal(&self.0, "TERM");
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} failed");
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits for `cond`, failing with `what` after 30 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Setup {
    dir: tempfile::TempDir,
    _up: FakeProvider,
    listen: SocketAddr,
    metrics: SocketAddr,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let up = FakeProvider::start(&ca, "up", Behavior::Ok).await;
    let listen = free_addr();
    let metrics = free_addr();
    std::fs::write(
        dir.path().join("policy.head"),
        format!(
            r"providers:
  targets:
    - id: main
      provider: openai
      base_url: {}
      secret_key_ref: {{env: KT_SINKS_KEY}}
gateway:
  listen: {listen}
  metrics: {metrics}
",
            up.openai_base_url()
        ),
    )
    .unwrap();
    Setup {
        dir,
        _up: up,
        listen,
        metrics,
    }
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts kt with `audit` as the `policy.audit-logger` section; waits
    /// until it listens.
    fn kt(&self, audit: &str, stdout: Stdio) -> Proc {
        let head = std::fs::read_to_string(self.path("policy.head")).unwrap();
        let cfg = self.path("policy.yaml");
        std::fs::write(&cfg, format!("{head}policy:\n  audit-logger:\n{audit}")).unwrap();
        let log = self.path("kt.log");
        let mut kt = Proc(
            Command::new(KT)
                .args(["gateway", "run", "--config"])
                .arg(&cfg)
                .env("KT_DATA_DIR", self.path("data"))
                .env("SSL_CERT_FILE", self.path("ca.pem"))
                .env("KT_SINKS_KEY", KEY)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        wait_for("kt did not start", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let exited = kt.0.try_wait().ok().flatten();
            assert!(exited.is_none(), "kt exited ({exited:?}):\n{text}");
            text.contains("gateway listening")
        });
        kt
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("kt.log")).unwrap_or_default()
    }

    /// `n` requests over `conns` connections at once; their request ids.
    async fn load(&self, n: usize, conns: usize) -> Vec<String> {
        let mut tasks = Vec::new();
        for c in 0..conns {
            let listen = self.listen;
            let share = n / conns + usize::from(c < n % conns);
            tasks.push(tokio::spawn(async move {
                let mut conn = h1_plain(listen).await;
                let mut ids = Vec::new();
                for _ in 0..share {
                    let a = send(&mut conn, request()).await;
                    assert_eq!(a.status, 200, "{}", a.body);
                    ids.push(request_id(&a.headers));
                }
                ids
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.extend(t.await.unwrap());
        }
        ids
    }

    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.metrics).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

fn request() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let auth = format!("Bearer {KEY}");
    post(
        "/openai/v1/chat/completions",
        &[("authorization", auth.as_str())],
        chat_body(false),
    )
}

fn request_id(h: &http::HeaderMap) -> String {
    h.get("x-kt-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap()
        .to_string()
}

/// Every JSON line of `path`.
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// An rsyslogd of this test: UDP and TCP inputs on loopback ports, kt's
/// messages written to `out` as `INPUT MSGID MSG`.
struct Rsyslog {
    _proc: Proc,
    udp: SocketAddr,
    tcp: SocketAddr,
    out: PathBuf,
}

fn rsyslogd() -> Option<PathBuf> {
    ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Rsyslog {
    fn start(dir: &Path, bin: &Path) -> Rsyslog {
        let (udp, tcp) = (free_udp(), free_addr());
        let out = dir.join("received.log");
        let work = dir.join("rsyslog-work");
        std::fs::create_dir(&work).unwrap();
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{work}" maxMessageSize="64k")
module(load="imudp")
module(load="imtcp")
input(type="imudp" address="127.0.0.1" port="{up}")
input(type="imtcp" address="127.0.0.1" port="{tp}")
template(name="kt" type="string" string="%inputname% %msgid% %msg%\n")
if $app-name == "kt" then {{
  action(type="omfile" file="{out}" template="kt")
}}
"#,
                work = work.display(),
                up = udp.port(),
                tp = tcp.port(),
                out = out.display(),
            ),
        )
        .unwrap();
        let proc = Proc(
            Command::new(bin)
                .arg("-n")
                .arg("-f")
                .arg(&conf)
                .arg("-i")
                .arg(dir.join("rsyslogd.pid"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("rsyslogd.err")).unwrap())
                .spawn()
                .unwrap(),
        );
        // Ready when a probe sent over each input has been written out.
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        wait_for("rsyslogd did not take UDP", || {
            let _ = probe.send_to(b"<134>1 - - kt - probe - udp-ready", udp);
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("udp-ready")
        });
        wait_for("rsyslogd did not take TCP", || {
            if let Ok(mut s) = TcpStream::connect(tcp) {
                let msg = "<134>1 - - kt - probe - tcp-ready";
                let _ = write!(s, "{} {msg}", msg.len());
            }
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("tcp-ready")
        });
        Rsyslog {
            _proc: proc,
            udp,
            tcp,
            out,
        }
    }

    /// Per input (`imudp`, `imtcp`), the request ids received, from the
    /// JSON in MSG (checked to be the versioned event shape, MSGID its
    /// decision).
    fn received(&self) -> HashMap<String, Vec<String>> {
        let mut by_input: HashMap<String, Vec<String>> = HashMap::new();
        for line in std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
        {
            let mut parts = line.splitn(3, ' ');
            let (Some(input), Some(msgid), Some(msg)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if msgid == "probe" {
                continue;
            }
            let json: serde_json::Value =
                serde_json::from_str(msg.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(json["schema"], 1, "{line}");
            assert_eq!(json["decision"], msgid, "{line}");
            by_input
                .entry(input.to_string())
                .or_default()
                .push(json["request_id"].as_str().unwrap().to_string());
        }
        by_input
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_rsyslogd_receives_every_event_over_udp_and_tcp() {
    let Some(bin) = rsyslogd() else {
        guard_tests::skipped(
            "sinks: the real rsyslogd",
            "rsyslogd is not installed (cargo xtask setup installs rsyslog)",
        );
        return;
    };
    let s = setup().await;
    let syslog = Rsyslog::start(s.dir.path(), &bin);
    let kt = s.kt(
        &format!(
            "    sinks:\n      - type: syslog\n        address: udp://{}\n      \
             - type: syslog\n        address: tcp://{}\n        on_failure: refuse\n",
            syslog.udp, syslog.tcp
        ),
        Stdio::null(),
    );
    let ids = s.load(50, 2).await;
    // kt writes what is queued before it exits.
    kt.stop();
    let mut want = ids.clone();
    want.sort();
    wait_for("rsyslogd did not write every event", || {
        let got = syslog.received();
        ["imudp", "imtcp"]
            .iter()
            .all(|i| got.get(*i).is_some_and(|v| v.len() >= ids.len()))
    });
    let got = syslog.received();
    for input in ["imudp", "imtcp"] {
        let mut v = got[input].clone();
        v.sort();
        assert_eq!(v, want, "{input}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_sink_rotates_under_load_and_on_sigusr1_without_losing_or_duplicating() {
    let s = setup().await;
    let path = s.path("events.jsonl");
    let kt = s.kt(
        &format!(
            "    sinks:\n      - type: file\n        path: {}\n        rotate_bytes: 16384\n        \
             max_files: 1000\n",
            path.display()
        ),
        Stdio::null(),
    );
    let mut ids = s.load(1000, 4).await;
    // logrotate's move, then its postrotate `kill -USR1`.
    std::fs::rename(&path, s.path("events.jsonl.moved")).unwrap();
    signal(&kt.0, "USR1");
    ids.extend(s.load(1000, 4).await);
    kt.stop();

    let mut count: HashMap<String, usize> = HashMap::new();
    let mut files = 0;
    for entry in std::fs::read_dir(s.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("events.jsonl") {
            continue;
        }
        files += 1;
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600,
            "{name}"
        );
        for line in json_lines(&p) {
            assert_eq!(line["schema"], 1);
            assert_ne!(line["policy"][0]["rule_id"], "sink-dropped", "{line}");
            *count
                .entry(line["request_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert!(files > 10, "only {files} files: no rotation?");
    let bytes: u64 = std::fs::read_dir(s.dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("events.jsonl"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "{} events in {files} files, {} bytes per event",
        ids.len(),
        bytes / u64::try_from(ids.len()).unwrap()
    );
    assert!(s.path("events.jsonl").exists(), "reopened after the move");
    assert_eq!(ids.len(), 2000);
    for id in &ids {
        assert_eq!(count.get(id), Some(&1), "request {id}");
    }
    assert_eq!(count.len(), ids.len(), "events of no request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdout_sink_prints_each_event_as_a_json_line() {
    let s = setup().await;
    let mut kt = s.kt("    sinks:\n      - type: stdout\n", Stdio::piped());
    let stdout: ChildStdout = kt.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let ids = s.load(3, 1).await;
    let mut seen = Vec::new();
    while seen.len() < ids.len() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("an event line on kt's stdout");
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["schema"], 1);
        assert_eq!(json["provider"], "openai");
        assert_eq!(json["status"], 200);
        seen.push(json["request_id"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, ids);
    // Nothing else goes to stdout: kt's own log is on stderr.
    assert!(s.log().contains("gateway listening"));
    kt.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_sink_that_is_down_refuses_requests_until_it_recovers() {
    let s = setup().await;
    let dir = s.path("not-yet");
    let path = dir.join("events.jsonl");
    let kt = s.kt(
        &format!(
            "    sinks:\n      - type: file\n        path: {}\n        on_failure: refuse\n",
            path.display()
        ),
        Stdio::null(),
    );
    let mut c = h1_plain(s.listen).await;
    let a = send(&mut c, request()).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body.contains("kt_audit_unavailable"), "{}", a.body);
    assert!(s.log().contains("event sink unavailable"), "{}", s.log());

    std::fs::create_dir(&dir).unwrap();
    let start = Instant::now();
    let served = loop {
        let a = send(&mut c, request()).await;
        if a.status == 200 {
            break request_id(&a.headers);
        }
        assert_eq!(a.status, 503, "{}", a.body);
        assert!(start.elapsed() < Duration::from_secs(30), "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    kt.stop();
    let lines = json_lines(&path);
    assert!(lines.iter().any(|l| l["request_id"] == served.as_str()));
    // The refusals' own events could not be written: counted, reported.
    let loss = lines
        .iter()
        .find(|l| l["policy"][0]["rule_id"] == "sink-dropped")
        .expect("a sink-dropped event");
    assert!(
        loss["message"]
            .as_str()
            .unwrap()
            .contains("lost while it was down"),
        "{loss}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logging_sink_that_is_down_keeps_serving_and_counts_what_it_missed() {
    let s = setup().await;
    let path = s.path("missing").join("events.jsonl");
    let kt = s.kt(
        &format!(
            "    sinks:\n      - type: file\n        path: {}\n",
            path.display()
        ),
        Stdio::null(),
    );
    let ids = s.load(3, 1).await;
    assert_eq!(ids.len(), 3);
    let sink = format!("file:{}", path.display());
    wait_for("the drops are counted", || {
        s.metrics().lines().any(|l| {
            l.starts_with("kt_event_sink_dropped_total")
                && l.contains(&format!("sink=\"{sink}\""))
                && l.contains("reason=\"sink_down\"")
                && l.ends_with(" 3")
        })
    });
    let text = s.metrics();
    assert!(
        text.lines()
            .any(|l| l.starts_with("kt_event_sink_up") && l.ends_with(" 0")),
        "{text}"
    );
    kt.stop();
}
