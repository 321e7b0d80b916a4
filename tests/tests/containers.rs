//! Containers: `kt run` captures provider connections from another network
//! namespace (needs root; CI is root here).
//!
//! Each test builds Docker's shape itself: a Linux bridge on the host with
//! a gateway address (10.213.N.1/24, fd6b:74:N::1/64), a veth pair with one
//! end on the bridge and the other in a new network namespace (with a
//! private mount namespace whose /etc/hosts maps the provider's name to a
//! test address), the namespace's default routes through the bridge, and
//! masquerade for traffic leaving through another interface when `nft` is
//! installed (as Docker does; it must not touch kt's connections, which
//! stay on the host). A curl inside, in the test's child cgroup, with a
//! hard-coded old key and CI variables (and a secret) in its environment,
//! calls `https://api.openai.com`, trusting kt's CA the way the README
//! tells container jobs to (`kt ca export --bundle` and `--env PATH`); kt
//! redirects it to its container address
//! on `lo`, swaps the key, and the fake provider (on host loopback) sees
//! only the managed key; the event names the namespace, the container id
//! (from a `docker-<id>.scope` cgroup the test makes) and the CI variables,
//! and never the secret.
//!
//! Only addresses inside the namespaces and on interfaces this test makes,
//! and loopback; every name is unique per run (`kt<pid><n>`). Everything
//! is removed on drop, also on panic. When `docker` can run a container
//! from a local image, one real container test runs too; otherwise it says
//! why it was skipped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use guard_tests::cgroup::TestCgroup;
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::mountns::PrivateMounts;
use guard_tests::process::{KtChild, text, wait_until};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const CLIENT: &str = env!("CARGO_BIN_EXE_kt-test-client");
const MANAGED: &str = "sk-ctrtest-managed-TUFOQUdFRF9DT05UQUlORVI";
/// The key hard-coded in the job (not key-shaped on purpose: only the
/// gateway's exact redaction keeps it out of the recorded command line).
const OLD: &str = "legacy-container-token-7d2e91c0";
/// In the job's environment; must never reach an event.
const SECRET: &str = "deploy-secret-value-5b8c0f13a9e2";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn skip() -> bool {
    guard_tests::ebpf_tests_off("containers")
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// A bridge network with one "container" namespace on it, Docker's shape.
/// Drop removes every interface, the namespaces, the nft table and any
/// address kt (killed half way) left on `lo`.
struct BridgeNet {
    bridge: String,
    veth: String,
    /// `unshare -n -m` holding the namespaces (its stdin is our pipe).
    holder: Child,
    _stdin: ChildStdin,
    nft_table: Option<String>,
    /// kt's container addresses (`kt run` removes them; a killed kt not).
    kt_addrs: Vec<String>,
    /// 10.213.N.0/24 and fd6b:74:N::/64.
    n: u8,
    _dir: tempfile::TempDir,
}

impl BridgeNet {
    fn new() -> BridgeNet {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{seq}", std::process::id() % 100_000);
        // A /24 no route on the host uses yet.
        let n = (0..250u32)
            .map(|i| ((std::process::id() + seq * 7 + i) % 250 + 1) as u8)
            .find(|n| {
                let out = Command::new("ip")
                    .args([
                        "-4",
                        "route",
                        "show",
                        "to",
                        "match",
                        &format!("10.213.{n}.1"),
                    ])
                    .output()
                    .map_or(true, |o| {
                        String::from_utf8_lossy(&o.stdout).contains("10.213.")
                    });
                !out
            })
            .expect("a free 10.213.N.0/24");
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            format!(
                "127.0.0.1 localhost\n::1 localhost\n{} api.openai.com\n{} api.openai.com\n",
                Self::provider4_of(n),
                Self::provider6_of(n)
            ),
        )
        .unwrap();
        let setup = format!(
            "mount --bind '{}' /etc/hosts && ip link set lo up && echo ready && exec cat >/dev/null",
            hosts.display()
        );
        let mut holder = Command::new("unshare")
            .args(["-n", "-m", "--propagation", "private", "sh", "-c", &setup])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("unshare");
        let stdin = holder.stdin.take().unwrap();
        let mut net = BridgeNet {
            bridge: format!("ktb{tag}"),
            veth: format!("ktv{tag}"),
            holder,
            _stdin: stdin,
            nft_table: None,
            kt_addrs: Vec::new(),
            n,
            _dir: dir,
        };
        let mut line = [0u8; 6];
        let ready = net
            .holder
            .stdout
            .take()
            .is_some_and(|mut o| o.read_exact(&mut line).is_ok() && &line == b"ready\n");
        assert!(ready, "the test namespaces could not be made (needs root)");
        net.build();
        net
    }

    fn provider4_of(n: u8) -> String {
        format!("10.213.{n}.77")
    }

    fn provider6_of(n: u8) -> String {
        format!("fd6b:74:{n}::77")
    }

    /// The address the namespace's /etc/hosts gives `api.openai.com`: in
    /// the bridge's subnet, where nothing answers (never a real host).
    fn provider4(&self) -> String {
        Self::provider4_of(self.n)
    }

    fn provider6(&self) -> String {
        Self::provider6_of(self.n)
    }

    fn pid(&self) -> String {
        self.holder.id().to_string()
    }

    /// Runs `ip` inside the namespace.
    fn ip_in(&self, args: &[&str]) -> Result<(), String> {
        let pid = self.pid();
        let mut full = vec!["-t", pid.as_str(), "-n", "--", "ip"];
        full.extend_from_slice(args);
        let out = Command::new("nsenter")
            .args(&full)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "(in namespace) ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn build(&mut self) {
        let (br, vh) = (self.bridge.clone(), format!("{}h", self.veth));
        let vc = format!("{}c", self.veth);
        let n = self.n;
        let gw4 = format!("10.213.{n}.1/24");
        let gw6 = format!("fd6b:74:{n}::1/64");
        must(ip(&["link", "add", &br, "type", "bridge"]));
        must(ip(&["addr", "add", &gw4, "dev", &br]));
        must(ip(&["-6", "addr", "add", &gw6, "dev", &br, "nodad"]));
        must(ip(&["link", "set", &br, "up"]));
        must(ip(&[
            "link", "add", &vh, "type", "veth", "peer", "name", &vc,
        ]));
        must(ip(&["link", "set", &vh, "master", &br]));
        must(ip(&["link", "set", &vh, "up"]));
        must(ip(&["link", "set", &vc, "netns", &self.pid()]));
        must(self.ip_in(&["addr", "add", &format!("10.213.{n}.2/24"), "dev", &vc]));
        must(self.ip_in(&[
            "-6",
            "addr",
            "add",
            &format!("fd6b:74:{n}::2/64"),
            "dev",
            &vc,
            "nodad",
        ]));
        must(self.ip_in(&["link", "set", &vc, "up"]));
        must(self.ip_in(&["route", "add", "default", "via", &format!("10.213.{n}.1")]));
        must(self.ip_in(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd6b:74:{n}::1"),
        ]));
        // Docker's masquerade: traffic from the bridge's subnet leaving
        // through another interface. kt's address is local: it must not
        // apply (the test would then see a rewritten source and no record).
        if have("nft") {
            let table = format!("kt_test_{}", self.bridge);
            let script = format!(
                "add table ip {table}\n\
                 add chain ip {table} post {{ type nat hook postrouting priority 100 ; }}\n\
                 add rule ip {table} post ip saddr 10.213.{n}.0/24 oifname != \"{br}\" masquerade\n"
            );
            let ok = Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().unwrap().write_all(script.as_bytes())?;
                    c.wait()
                })
                .is_ok_and(|s| s.success());
            assert!(ok, "nft could not add the masquerade rule");
            self.nft_table = Some(table);
        } else {
            eprintln!(
                "containers: no `nft` on this host: the namespace's outbound masquerade rule (Docker's shape) is not installed for this test"
            );
        }
    }

    /// The namespace's network namespace inode.
    fn netns_inode(&self) -> u64 {
        let link = std::fs::read_link(format!("/proc/{}/ns/net", self.pid())).unwrap();
        let text = link.to_string_lossy().into_owned();
        text.trim_start_matches("net:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    /// A command run inside both namespaces (nsenter execs it: its pid is
    /// the command's).
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid(), "-n", "-m", "--", program]);
        c
    }
}

impl Drop for BridgeNet {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // The namespace's end of the veth pair went with it; the host end
        // and the bridge are ours to remove.
        let _ = ip(&["link", "del", &format!("{}h", self.veth)]);
        let _ = ip(&["link", "del", &self.bridge]);
        if let Some(t) = &self.nft_table {
            let _ = Command::new("nft")
                .args(["delete", "table", "ip", t])
                .status();
        }
        for a in &self.kt_addrs {
            let _ = ip(&["addr", "del", a, "dev", "lo"]);
        }
    }
}

/// A child cgroup named as Docker's systemd driver names a container's
/// (`docker-<id>.scope`), inside the test cgroup. On drop every process in
/// it is killed (`cgroup.kill`: only ours are there) and it is removed.
struct ContainerCgroup {
    path: PathBuf,
    id: String,
}

impl ContainerCgroup {
    fn new(parent: &TestCgroup) -> ContainerCgroup {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:08x}{:08x}", std::process::id(), seq).repeat(4);
        let path = parent.path().join(format!("docker-{id}.scope"));
        std::fs::create_dir(&path).unwrap();
        ContainerCgroup { path, id }
    }

    fn enter(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

/// `kt run` over a test cgroup with `capture.containers` on, one fake
/// provider on host loopback. Field order is drop order.
struct Scenario {
    kt: Option<KtChild>,
    container: ContainerCgroup,
    cgroup: TestCgroup,
    _mounts: PrivateMounts,
    net: BridgeNet,
    provider: FakeProvider,
    data: PathBuf,
    log: PathBuf,
    kt_addr4: String,
    kt_addr6: String,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn kt(data: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    guard_tests::kt_run::kt_cmd(KT, data, args, stdin)
}

fn free_port() -> u16 {
    guard_tests::process::free_addr().port()
}

impl Scenario {
    fn start(label: &str) -> Scenario {
        Scenario::start_with(label, true, "provider")
    }

    /// As [`Scenario::start`]; `ipv6`: false sets `address6: null` (no
    /// IPv6 listener for containers); `scope` is `capture.scope`.
    fn start_with(label: &str, ipv6: bool, scope: &str) -> Scenario {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ca = TestCa::new();
        let mut net = BridgeNet::new();
        let n = net.n;
        let provider = rt.block_on(FakeProvider::start_at(
            &ca,
            "fake-ctr",
            Behavior::Ok,
            format!("127.79.{n}.10:0").parse().unwrap(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let out = kt(
            &data,
            &["secrets", "add", "OPENAI_API_KEY", "--store"],
            Some(MANAGED),
        );
        assert!(out.status.success(), "{}", text(&out));
        // Unique per run, so parallel tests never share (or remove) one.
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let kt_addr4 = format!("169.254.{}.{}", n, 10 + seq % 240);
        let kt_addr6 = format!("fd6b:7400:{:x}::{:x}", std::process::id() % 0xffff, seq + 1);
        net.kt_addrs = vec![format!("{kt_addr4}/32"), format!("{kt_addr6}/128")];
        let yaml = format!(
            r#"pack:
  name: containers-test
  version: "1.0.0"
  enabled: true
providers:
  targets:
    - id: openai-main
      provider: openai
      required: true
      base_url: {base}
      secret_key_ref:
        store: OPENAI_API_KEY
policies:
  chain:
    - audit-logger
gateway:
  listen: 127.0.0.1:{p1}
  capture_listen: 127.0.0.1:{p2}
  capture_listen6: "[::1]:{p3}"
capture:
  hosts: []
  cidrs: [{v4}/32, {v6}/128]
  ports: [443]
  scope: {scope}
  containers:
    address: {kt_addr4}
    address6: {addr6}
"#,
            base = provider.openai_base_url(),
            p1 = free_port(),
            p2 = free_port(),
            p3 = free_port(),
            v4 = net.provider4(),
            v6 = net.provider6(),
            addr6 = if ipv6 {
                format!("\"{kt_addr6}\"")
            } else {
                "null".to_string()
            },
        );
        let cfg = dir.path().join("kt.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let ca_pem = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca_pem, &ca.pem).unwrap();
        let mounts = PrivateMounts::new().expect("a private mount namespace (needs root)");
        let cgroup = TestCgroup::new(label).expect("child cgroup (needs root and cgroup v2)");
        let container = ContainerCgroup::new(&cgroup);
        let log = dir.path().join("kt.log");
        let child = mounts
            .command(KT)
            .args(["run", "--config", cfg.to_str().unwrap(), "--cgroup"])
            .arg(cgroup.path())
            .env("KT_DATA_DIR", &data)
            .env("SSL_CERT_FILE", &ca_pem)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        let kt_child = KtChild(child);
        cgroup.enter(pid).unwrap();
        let s = Scenario {
            kt: Some(kt_child),
            container,
            cgroup,
            _mounts: mounts,
            net,
            provider,
            data,
            log,
            kt_addr4,
            kt_addr6,
            _rt: rt,
            _dir: dir,
        };
        wait_until("kt run to capture", || {
            let t = s.kt_log();
            assert!(
                !t.contains("Error") && !t.contains("error:"),
                "kt run failed:\n{t}"
            );
            t.contains("kt: capturing").then_some(())
        });
        s
    }

    fn kt_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// curl inside the namespace and the container cgroup, with the job's
    /// own key and CI variables (and a secret) in its environment; `opts`
    /// are more curl options (`-4`, `-6`, `--resolve …`).
    /// It trusts kt's CA the way the README tells container jobs to: the
    /// file `kt ca export --bundle` writes, through the variables `kt ca
    /// export --env PATH` prints (curl reads `CURL_CA_BUNDLE`).
    fn curl(&mut self, host: &str, opts: &str) -> (bool, String, String) {
        let bundle = self.data.with_file_name("ca-bundle.pem");
        let out = kt(&self.data, &["ca", "export", "--bundle"], None);
        assert!(out.status.success(), "{}", text(&out));
        std::fs::write(&bundle, &out.stdout).unwrap();
        let out = kt(
            &self.data,
            &["ca", "export", "--env", bundle.to_str().unwrap()],
            None,
        );
        assert!(out.status.success(), "{}", text(&out));
        let env: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(env.iter().any(|(k, _)| k == "CURL_CA_BUNDLE"), "{env:?}");
        self.curl_with(host, opts, None, &env)
    }

    /// As [`Scenario::curl`], trusting the CA in `ca` only.
    fn curl_trusting(&mut self, host: &str, opts: &str, ca: &Path) -> (bool, String, String) {
        self.curl_with(host, opts, Some(ca), &[])
    }

    fn curl_with(
        &mut self,
        host: &str,
        opts: &str,
        cacert: Option<&Path>,
        env: &[(String, String)],
    ) -> (bool, String, String) {
        let cacert = cacert.map_or_else(String::new, |c| format!("--cacert '{}'", c.display()));
        let script = format!(
            r#"read go; exec curl {opts} -sS --max-time 20 {cacert} -H "Authorization: Bearer $OLD_KEY" -H 'content-type: application/json' -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}]}}' https://{host}/v1/chat/completions"#
        );
        let mut job = self.net.command("sh");
        job.arg("-c")
            .arg(script)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("OLD_KEY", OLD)
            .env("GITHUB_RUN_ID", "4242")
            .env("GITHUB_JOB", "containers")
            .env("CI_JOB_ID", "99")
            .env("DEPLOY_TOKEN", SECRET)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut job = job.spawn().unwrap();
        let mut go = job.stdin.take().unwrap();
        let mut stdout = job.stdout.take().unwrap();
        let mut stderr = job.stderr.take().unwrap();
        let pid = self.cgroup.adopt(job).unwrap();
        self.container.enter(pid);
        go.write_all(b"go\n").unwrap();
        drop(go);
        let mut body = String::new();
        stdout.read_to_string(&mut body).unwrap();
        let mut err = String::new();
        stderr.read_to_string(&mut err).unwrap();
        let status = self.cgroup.wait(pid).unwrap().status;
        (status.success(), body, err)
    }

    /// The test client inside the namespace and the container cgroup;
    /// its `key=value` output.
    fn test_client(&mut self, args: &[&str]) -> String {
        // It waits for a line on stdin before it does anything.
        let mut c = self.net.command(CLIENT);
        c.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().unwrap();
        let mut go = child.stdin.take().unwrap();
        let pid = self.cgroup.adopt(child).unwrap();
        self.container.enter(pid);
        go.write_all(b"go\n").unwrap();
        drop(go);
        String::from_utf8_lossy(&self.cgroup.wait(pid).unwrap().stdout).into_owned()
    }

    fn events(&self) -> Vec<serde_json::Value> {
        let out = kt(&self.data, &["--output", "json", "events"], None);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn check_captured(&mut self, host: &str, opts: &str) {
        let (ok, body, err) = self.curl(host, opts);
        assert!(
            ok,
            "curl in the namespace failed: {err}\nkt log:\n{}",
            self.kt_log()
        );
        assert!(body.contains("fake-ctr"), "{body}");
        let seen = self.provider.requests();
        let last = seen.last().expect("the provider saw no request");
        let auth = last.headers.get("authorization").unwrap().to_str().unwrap();
        assert_eq!(auth, format!("Bearer {MANAGED}"));
        assert!(
            seen.iter()
                .all(|r| !format!("{:?}", r.headers).contains(OLD)),
            "the job's own key reached the provider"
        );
        // Read the event after kt wrote it.
        let want = seen.len();
        let events = wait_until("the events of the captured requests", || {
            let e = self.events();
            (e.iter().filter(|e| e["client"]["pid"].is_u64()).count() >= want).then_some(e)
        });
        let event = events
            .iter()
            .rev()
            .find(|e| e["client"]["pid"].is_u64())
            .unwrap();
        let client = &event["client"];
        assert_eq!(
            client["netns"].as_u64(),
            Some(self.net.netns_inode()),
            "{event}"
        );
        assert_eq!(
            client["container_id"].as_str(),
            Some(self.container.id.as_str()),
            "{event}"
        );
        assert_eq!(client["ci"]["GITHUB_RUN_ID"], "4242", "{event}");
        assert_eq!(client["ci"]["GITHUB_JOB"], "containers", "{event}");
        assert_eq!(client["ci"]["CI_JOB_ID"], "99", "{event}");
        assert!(client["ppid"].is_u64(), "{event}");
        assert!(
            client["exe"].as_str().is_some_and(|e| e.ends_with("curl")),
            "{event}"
        );
        let all = serde_json::to_string(&events).unwrap();
        assert!(
            !all.contains(SECRET),
            "a secret from the environment: {all}"
        );
        assert!(!all.contains("DEPLOY_TOKEN"), "{all}");
        assert!(!all.contains(OLD), "{all}");
        // The table shows the container and the CI job too.
        let table = kt(&self.data, &["events"], None);
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(
            table.contains(&format!("ctr:{}", &self.container.id[..12]))
                && table.contains("GITHUB_RUN_ID=4242"),
            "{table}"
        );
    }

    /// Stops kt with SIGTERM and waits: it removes its container addresses.
    fn stop(&mut self) -> String {
        let mut child = self.kt.take().unwrap();
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        let _ = child.0.wait();
        self.kt_log()
    }
}

#[test]
fn a_client_that_does_not_trust_kts_ca_is_recorded_as_rejecting_it() {
    if skip() {
        return;
    }
    let mut s = Scenario::start("ctrca");
    // A container whose bundle lacks kt's CA: any other CA will do.
    let other = s.data.with_file_name("other-ca.pem");
    std::fs::write(&other, TestCa::new().pem).unwrap();
    let (ok, _, err) = s.curl_trusting("api.openai.com", "-4", &other);
    assert!(!ok, "curl trusted a certificate it has no CA for: {err}");
    assert!(s.provider.requests().is_empty(), "a request went through");
    let events = wait_until("the client-rejected-ca event", || {
        let e = s.events();
        e.iter()
            .any(|e| e.to_string().contains("client-rejected-ca"))
            .then_some(e)
    });
    let event = events
        .iter()
        .find(|e| e.to_string().contains("client-rejected-ca"))
        .unwrap();
    assert_eq!(
        event["client"]["container_id"].as_str(),
        Some(s.container.id.as_str()),
        "{event}"
    );
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not trust kt's CA")),
        "{event}"
    );
    let table = kt(&s.data, &["events"], None);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("client-rejected-ca"),
        "{}",
        text(&table)
    );
}

#[test]
fn without_an_ipv6_listener_for_containers_their_ipv6_is_refused_never_direct() {
    if skip() {
        return;
    }
    let mut s = Scenario::start_with("ctrno6", false, "provider");
    assert!(!on_lo(&s.kt_addr6));
    let (ok, _, err) = s.curl("api.openai.com", "-6");
    assert!(!ok);
    // Refused at connect() (EPERM): curl could not connect at all.
    assert!(
        err.contains("Failed to connect") || err.contains("Couldn't connect"),
        "{err}"
    );
    assert!(s.provider.requests().is_empty());
    // IPv4 from the same namespace still goes through kt.
    s.check_captured("api.openai.com", "-4");
}

#[test]
fn port_wide_capture_leaves_a_containers_own_loopback_alone() {
    if skip() {
        return;
    }
    let mut s = Scenario::start_with("ctrport", true, "port");
    // Port 443 of the namespace's own loopback is the container's own
    // service: captured, it would be sent to kt (and spliced to the host's
    // loopback, the wrong place).
    let out = s.test_client(&["tcp", "127.0.0.1:443", "--serve"]);
    assert!(out.contains("served=1"), "{out}");
    assert!(!out.contains("connect_error"), "{out}");
    // Provider connections from it still go through kt.
    s.check_captured("api.openai.com", "-4");
}

#[test]
fn a_real_docker_container_is_captured_or_the_skip_says_why() {
    if skip() {
        return;
    }
    let why = if !have("docker") {
        Some("no `docker` client installed".to_string())
    } else {
        let info = Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .output();
        match info {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "the docker daemon is not reachable ({}); this test never starts or reconfigures one",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
            )),
            Err(e) => Some(format!("docker could not run: {e}")),
        }
    };
    match why {
        Some(reason) => guard_tests::skipped("containers: the real Docker container", &reason),
        None => guard_tests::skipped(
            "containers: the real Docker container",
            "a daemon answers, but running one inside the test's cgroup (--cgroup-parent) from a \
             locally built image is not implemented yet",
        ),
    }
}

fn on_lo(addr: &str) -> bool {
    let out = Command::new("ip")
        .args(["addr", "show", "dev", "lo"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {addr}/"))
}

#[test]
fn a_job_in_another_network_namespace_is_captured_over_ipv4_and_named() {
    if skip() {
        return;
    }
    let mut s = Scenario::start("ctr4");
    assert!(on_lo(&s.kt_addr4), "kt did not add its container address");
    s.check_captured("api.openai.com", "-4");
    // A dual-stack socket reaching the IPv4 address (IPv4-mapped).
    let mapped = format!(
        "--resolve 'api.openai.com:443:[::ffff:{}]'",
        s.net.provider4()
    );
    s.check_captured("api.openai.com", &mapped);
    let log = s.stop();
    assert!(
        !on_lo(&s.kt_addr4) && !on_lo(&s.kt_addr6),
        "kt left its container addresses on lo\n{log}"
    );
}

#[test]
fn a_job_in_another_network_namespace_is_captured_over_ipv6() {
    if skip() {
        return;
    }
    let mut s = Scenario::start("ctr6");
    assert!(
        on_lo(&s.kt_addr6),
        "kt did not add its IPv6 container address"
    );
    s.check_captured("api.openai.com", "-6");
}
