//! `cargo xtask demo`: the whole story, offline, on loopback, in under a
//! minute once built.
//!
//! A fake provider plays api.openai.com on 127.77.0.20/21:443; `kt run`
//! captures a child cgroup of the cgroup2 mount; a "legacy" job in that
//! cgroup still has the Q1 key hard coded; the primary target (new Q2 key)
//! is down, so the fallback answers; a prompt with a pasted AWS key is
//! blocked; then the events and the key report. Everything it starts is
//! ended by pid and the cgroup and temp dir are removed, also on Ctrl-C.
//!
//! Without root (no eBPF) it tells so and shows the same flow with the job
//! pointed at the gateway explicitly (`OPENAI_BASE_URL`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

const Q2: &str = "sk-demo-NEW-2026q2-key-Zm9yIGRlbW8gb25seQ";
const Q1: &str = "sk-demo-OLD-2026q1-key-bGVnYWN5IGtleSBpbiBDSQ";

#[derive(Default)]
struct Cleanup {
    children: Vec<Child>,
    cgroup: Option<PathBuf>,
    dir: Option<PathBuf>,
}

impl Cleanup {
    fn run(&mut self) {
        for c in &mut self.children {
            // SIGTERM first so `kt run` drains and detaches; then make sure.
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let start = Instant::now();
        for c in &mut self.children {
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        if let Some(cg) = self.cgroup.take() {
            for _ in 0..50 {
                if std::fs::remove_dir(&cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn say(title: &str) {
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!("\n\x1b[1m== {title}\x1b[0m");
    } else {
        println!("\n== {title}");
    }
}

pub fn run(vault: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    say("building kt and the fake provider");
    crate::cargo(&[
        "build",
        "--locked",
        "--quiet",
        "-p",
        "guard",
        "--bin",
        "kt",
        "-p",
        "guard-tests",
        "--bin",
        "kt-fake-provider",
    ])?;
    let root = workspace_root()?;
    // Where cargo put them: CARGO_TARGET_DIR (relative to the root) when set.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |t| root.join(t));
    let bin = target.join("debug");
    let kt_bin = bin.join("kt");

    let cleanup = Arc::new(Mutex::new(Cleanup::default()));
    {
        let c = cleanup.clone();
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: cleaning up");
            if let Ok(mut c) = c.lock() {
                c.run();
            }
            std::process::exit(130);
        })
        .context("installing the Ctrl-C handler")?;
    }
    let result = story(&kt_bin, &bin, &cleanup, vault);
    if let Ok(mut c) = cleanup.lock() {
        c.run();
    }
    result?;
    say(&format!(
        "done in {:.1} s; everything started was stopped and removed",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The root token of the demo's Vault-API dev server.
const VAULT_DEMO_TOKEN: &str = "kt-demo-root-token";

/// `--vault`: an OpenBao (or Vault) dev server on a free loopback port,
/// in memory; its address.
fn start_vault(cleanup: &Arc<Mutex<Cleanup>>) -> anyhow::Result<String> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find_map(|d| {
            ["bao", "vault"]
                .map(|n| d.join(n))
                .into_iter()
                .find(|p| p.is_file())
        });
    let cached = std::env::var_os("HOME").map(|h| {
        Path::new(&h)
            .join(".cache/kt-tests")
            .join(format!("openbao-{}", crate::setup::OPENBAO_VERSION))
            .join("bao")
    });
    let Some(bin) = std::env::var_os("KT_VAULT_SERVER")
        .map(PathBuf::from)
        .or(on_path)
        .or(cached.filter(|c| c.is_file()))
    else {
        bail!(
            "--vault needs a Vault-API server: `cargo xtask setup` installs OpenBao into ~/.cache/kt-tests, or put `bao`/`vault` on PATH"
        );
    };
    let port = free_ports(1)?[0];
    let child = Command::new(&bin)
        .args(["server", "-dev", "-dev-no-store-token"])
        .arg(format!("-dev-root-token-id={VAULT_DEMO_TOKEN}"))
        .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    lock(cleanup).children.push(child);
    let addr = format!("http://127.0.0.1:{port}");
    wait_until(
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the Vault-API server",
    )?;
    Ok(addr)
}

fn story(
    kt_bin: &Path,
    bin: &Path,
    cleanup: &Arc<Mutex<Cleanup>>,
    vault: bool,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("kt-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    lock(cleanup).dir = Some(dir.clone());
    let data = dir.join("data");
    let cfg = dir.join("demo.yaml");
    let vault_addr = if vault {
        say(
            "a Vault-API server (OpenBao dev server, in memory) on loopback holds the secrets: connected mode",
        );
        let a = start_vault(cleanup)?;
        println!("   {a}");
        Some(a)
    } else {
        None
    };
    let kt = |args: &[&str], stdin: Option<&str>| -> anyhow::Result<(i32, String)> {
        let mut c = Command::new(kt_bin);
        if vault_addr.is_some() {
            // `kt secrets add --store` finds the central store through the config.
            c.env("KT_CONFIG", &cfg)
                .env("VAULT_TOKEN", VAULT_DEMO_TOKEN);
        }
        let mut c = c
            .args(args)
            .env("KT_DATA_DIR", &data)
            // Probes trust the fake provider's CA, as `kt run` below does.
            .env("SSL_CERT_FILE", dir.join("fake-provider-ca.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kt")?;
        let mut i = c.stdin.take().context("kt stdin")?;
        if let Some(s) = stdin {
            i.write_all(s.as_bytes())?;
        }
        drop(i);
        let o = c.wait_with_output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok((o.status.code().unwrap_or(-1), text))
    };
    // KT_DEMO_NO_CAPTURE=1 shows the explicit-client variant even as root.
    let capture = is_root()
        && cgroup2().is_some()
        && std::env::var_os("KT_DEMO_NO_CAPTURE").is_none_or(|v| v != "1");
    // Port 443 needs root; without capture the fakes take free ports.
    let (primary, fallback) = if capture {
        ("127.77.0.20:443".to_string(), "127.77.0.21:443".to_string())
    } else {
        let p = free_ports(2)?;
        (format!("127.0.0.1:{}", p[0]), format!("127.0.0.1:{}", p[1]))
    };

    say("a fake api.openai.com on loopback: the primary (new key) is down, the fallback answers");
    let ca_pem = dir.join("fake-provider-ca.pem");
    let mut fake = Command::new(bin.join("kt-fake-provider"))
        .arg("--ca-out")
        .arg(&ca_pem)
        .arg(format!("primary={primary}=503"))
        .arg(format!("fallback={fallback}=ok"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the fake provider")?;
    let fake_out = fake.stdout.take().context("fake stdout")?;
    let fake_stdin = fake.stdin.take();
    lock(cleanup).children.push(fake);
    let fake_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let lines = fake_lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(fake_out).lines().map_while(Result::ok) {
                println!("   [provider] {l}");
                if let Ok(mut v) = lines.lock() {
                    v.push(l);
                }
            }
        });
    }
    wait_until(
        || fake_lines.lock().is_ok_and(|v| v.len() >= 2),
        "the fake provider",
    )?;

    let p = free_ports(1)?;
    // The capture port below 1024, as kt's default: only root can bind it,
    // so nothing else could take it over while kt is down.
    let cap = free_privileged_port().unwrap_or(free_ports(1)?[0]);
    let mut text = config(p[0], cap, cap, &primary, &fallback);
    if let Some(a) = &vault_addr {
        text.push_str(&format!(
            "secrets:\n  store:\n    backend: vault\n    address: {a}\n    refresh: 2s\n"
        ));
    }
    std::fs::write(&cfg, text)?;

    say(if vault_addr.is_some() {
        "kt secrets add --store: the new key and the old key still used by a CI job, written to Vault (nothing of them lands in the data dir)"
    } else {
        "kt secrets add: the new key (store) and the old key still used by a CI job"
    });
    for (name, value) in [("OPENAI_API_KEY_2026Q2", Q2), ("OPENAI_API_KEY_2026Q1", Q1)] {
        let (_, out) = kt(&["secrets", "add", name, "--store"], Some(value))?;
        print!("   {out}");
    }
    say("kt gateway check --verbose (the seed's preflight)");
    let (_, out) = kt(
        &[
            "gateway",
            "check",
            "--config",
            cfg.to_str().unwrap_or_default(),
            "--verbose",
        ],
        None,
    )?;
    for l in out.lines() {
        println!("   {l}");
    }

    let log = dir.join("kt-run.log");
    let mut run_args: Vec<String> = vec!["--config".into(), cfg.display().to_string()];
    let cg = if capture {
        let mount = cgroup2().context("cgroup2 mount")?;
        let cg = mount.join(format!("kt-demo-{}", std::process::id()));
        std::fs::create_dir(&cg).with_context(|| format!("creating {}", cg.display()))?;
        lock(cleanup).cgroup = Some(cg.clone());
        run_args = [
            vec!["run".into()],
            run_args,
            vec!["--cgroup".into(), cg.display().to_string()],
        ]
        .concat();
        say(&format!(
            "kt run: capturing the child cgroup {}",
            cg.display()
        ));
        Some(cg)
    } else {
        run_args = [vec!["gateway".into(), "run".into()], run_args].concat();
        say(
            "not root (or no cgroup v2): no eBPF capture; the job is pointed at the gateway with OPENAI_BASE_URL instead",
        );
        None
    };
    // Capture runs in a private mount namespace (unshare execs kt: same
    // pid): the bpffs kt mounts to pin its links, if the host has none,
    // goes away with it instead of staying on the host.
    let mut kt_cmd = if cg.is_some() {
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "--"]).arg(kt_bin);
        c
    } else {
        Command::new(kt_bin)
    };
    if vault_addr.is_some() {
        kt_cmd.env("VAULT_TOKEN", VAULT_DEMO_TOKEN);
    }
    let kt_run = kt_cmd
        .args(&run_args)
        .env("KT_DATA_DIR", &data)
        .env("SSL_CERT_FILE", &ca_pem)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting kt")?;
    let kt_pid = kt_run.id();
    lock(cleanup).children.push(kt_run);
    let ready = if capture {
        "kt: capturing"
    } else {
        "kt: gateway listening"
    };
    wait_until(
        || std::fs::read_to_string(&log).is_ok_and(|t| t.contains(ready)),
        "kt",
    )?;
    for l in std::fs::read_to_string(&log)?.lines() {
        println!("   [kt] {l}");
    }

    let kt_ca = data.join("ca/ca.pem");
    let url = if capture {
        "https://api.openai.com/v1/chat/completions".to_string()
    } else {
        format!("http://127.0.0.1:{}/openai/v1/chat/completions", p[0])
    };
    say(if capture {
        "a legacy CI job with the OLD key hard coded, no proxy settings, the real host name"
    } else {
        "a legacy CI job with the OLD key hard coded, pointed at kt by its base URL"
    });
    let answer = job(cg.as_deref(), &kt_ca, &url, "say hello")?;
    println!("   job got: {answer}");

    say("a developer pastes an AWS key into a prompt while debugging");
    let aws = ["AKIA", "DEMODEMODEMODEMO"].concat();
    let answer = job(
        cg.as_deref(),
        &kt_ca,
        &url,
        &format!("why does {aws} not work?"),
    )?;
    println!("   job got: {answer}");

    say("kt events --keys: who still uses the Q1 key? (kt is still running)");
    let (_, out) = kt(&["events", "--keys"], None)?;
    for l in out.lines() {
        println!("   {l}");
    }

    say(
        "the Q2 key's endpoint is fixed; kt secrets verify proves both keys with an unbilled probe",
    );
    let mut fake_stdin = fake_stdin;
    if let Some(i) = fake_stdin.as_mut() {
        i.write_all(b"primary=ok\n")?;
        i.flush()?;
    }
    wait_until(
        || {
            fake_lines
                .lock()
                .is_ok_and(|v| v.iter().any(|l| l.contains("now answers ok")))
        },
        "the fake primary to recover",
    )?;
    let cfg_s = cfg.to_str().unwrap_or_default();
    let (_, out) = kt(&["secrets", "verify", "--config", cfg_s], None)?;
    for l in out.lines() {
        println!("   {l}");
    }

    say(
        "kt secrets status: is it safe to remove the Q1 fallback? (traffic, probes, who still presents each key)",
    );
    let (_, out) = kt(&["secrets", "status", "--config", cfg_s], None)?;
    for l in out.lines() {
        println!("   {l}");
    }

    say("retire Q1: drop the fallback from the config and reload, without a restart");
    std::fs::write(
        &cfg,
        config_without_fallback(&std::fs::read_to_string(&cfg)?),
    )?;
    let (code, out) = kt(&["gateway", "reload"], None)?;
    for l in out.lines() {
        println!("   {l}");
    }
    anyhow::ensure!(code == 0, "kt gateway reload failed");

    say("the legacy job, unchanged (still the old key hard coded), keeps working on the Q2 key");
    let answer = job(cg.as_deref(), &kt_ca, &url, "say hello again")?;
    println!("   job got: {answer}");

    say("stopping kt (SIGTERM): it drains, detaches the programs, writes the last events");
    let _ = Command::new("kill")
        .args(["-TERM", &kt_pid.to_string()])
        .status();
    wait_until(
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|t| t.contains("kt: stopped") || t.contains("stopping"))
        },
        "kt to stop",
    )?;
    std::thread::sleep(Duration::from_millis(500));
    drop(fake_stdin);

    say("kt events: every decision, naming the process and the key it tried");
    let (_, out) = kt(&["events"], None)?;
    for l in out.lines() {
        println!("   {l}");
    }
    Ok(())
}

/// Runs one request as the legacy job; inside the cgroup when capturing.
fn job(cgroup: Option<&Path>, kt_ca: &Path, url: &str, prompt: &str) -> anyhow::Result<String> {
    let body =
        format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{prompt}"}}]}}"#);
    let mut c = Command::new("sh")
        .arg("-c")
        .arg(r#"read go; exec curl -sS --max-time 20 --resolve api.openai.com:443:127.77.0.20 --cacert "$KT_CA" -H "Authorization: Bearer $OLD_KEY" -H 'content-type: application/json' -d "$BODY" "$URL""#)
        .env("KT_CA", kt_ca)
        .env("OLD_KEY", Q1)
        .env("BODY", body)
        .env("URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the job (needs sh and curl)")?;
    let mut go = c.stdin.take().context("job stdin")?;
    if let Some(cg) = cgroup {
        std::fs::write(cg.join("cgroup.procs"), c.id().to_string())
            .with_context(|| format!("moving the job into {}", cg.display()))?;
    }
    go.write_all(b"go\n")?;
    drop(go);
    let out = c.wait_with_output()?;
    // Let the provider's own report of what it received print first.
    std::thread::sleep(Duration::from_millis(300));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if text.is_empty() {
        bail!("the job failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(text.chars().take(300).collect())
}

fn config(listen: u16, cap4: u16, cap6: u16, primary: &str, fallback: &str) -> String {
    format!(
        r#"# The seed's example plus what a loopback demo needs: base_url for the
# fake provider, and capture scoped to a test prefix.
pack:
  name: provider-key-rotation-demo
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
      model: gpt-5.4-mini-mini
      required: true
      base_url: https://{primary}/v1
      secret_key_ref:
        store: OPENAI_API_KEY_2026Q2
    - id: openai-2026q1
      provider: openai
      model: gpt-5.4-mini-mini
      required: false
      base_url: https://{fallback}/v1
      secret_key_ref:
        store: OPENAI_API_KEY_2026Q1
policies:
  chain:
    - dlp-filter
    - audit-logger
policy:
  dlp-filter:
    detect_patterns:
      - 'sk-[A-Za-z0-9]{{20,}}'
      - 'AKIA[0-9A-Z]{{16}}'
      - 'ghp_[0-9A-Za-z]{{36}}'
    blocked_terms:
      - openai production key
      - anthropic billing token
    action: block
    fuzzy_matching: true
    max_distance: 1
  audit-logger: {{}}
gateway:
  listen: 127.0.0.1:{listen}
  capture_listen: 127.0.0.1:{cap4}
  capture_listen6: "[::1]:{cap6}"
capture:
  hosts: []
  cidrs: [127.77.0.0/16]
  ports: [443]
"#
    )
}

/// The demo config with the Q1 fallback target removed (the rotation's
/// last step).
fn config_without_fallback(full: &str) -> String {
    let start = full.find("    - id: openai-2026q1").unwrap_or(full.len());
    let end = full[start..]
        .find("policies:")
        .map_or(full.len(), |i| start + i);
    format!("{}{}", &full[..start], &full[end..])
}

fn lock(c: &Arc<Mutex<Cleanup>>) -> std::sync::MutexGuard<'_, Cleanup> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{what} did not become ready in 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    ls.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// A port in 700..1000 free on both 127.0.0.1 and [::1] (root only).
fn free_privileged_port() -> Option<u16> {
    (700..1000).find(|port| {
        std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok()
            && std::net::TcpListener::bind(("::1", *port)).is_ok()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn cgroup2() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("run through `cargo xtask`")?;
    Path::new(&manifest)
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}
