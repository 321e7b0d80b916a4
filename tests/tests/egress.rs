//! Strict egress under `kt run`, as root, in a child cgroup.
//!
//! Safety: every job that reaches a non-loopback address runs in a network
//! namespace of its own with only `lo` up, so nothing it is let through can
//! leave the host (it fails with ENETUNREACH there); what the hook refuses
//! fails with EPERM before any routing. The addresses are TEST-NET ones
//! (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32). The
//! capture hooks are cgroup hooks, so they see the job in its namespace.

use std::process::Command;

use guard_tests::kt_run::{JOB_KEY, KtRun, MANAGED_KEY, guard_location, guard_rule};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const CLIENT: &str = env!("CARGO_BIN_EXE_kt-test-client");
const EPERM: &str = "1";
const ENETUNREACH: &str = "101";

fn skip() -> bool {
    guard_tests::ebpf_tests_off("egress")
}

/// The test client in a network namespace of its own (only `lo` up).
fn isolated(args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "-n",
        "sh",
        "-c",
        "ip link set lo up && exec \"$0\" \"$@\"",
        CLIENT,
    ])
    .args(args);
    c
}

/// curl with a hard-coded key, `api.openai.com` resolved to `addr` by the
/// job itself, trusting kt's CA; in its own namespace when `isolate`.
fn curl_job(s: &KtRun, addr: &str, isolate: bool) -> Command {
    let script = format!(
        r#"read go; exec curl -sS --max-time 20 --resolve api.openai.com:443:{addr} --cacert "{ca}" -H "Authorization: Bearer {JOB_KEY}" -H 'content-type: application/json' -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}]}}' https://api.openai.com/v1/chat/completions"#,
        ca = s.kt_ca.display()
    );
    if isolate {
        let mut c = Command::new("unshare");
        c.args(["-n", "sh", "-c", &format!("ip link set lo up && {script}")]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    }
}

fn egress_event<'a>(
    events: &'a [serde_json::Value],
    rule: &str,
    location: &str,
) -> Option<&'a serde_json::Value> {
    events
        .iter()
        .find(|e| guard_rule(e) == Some(rule) && guard_location(e) == Some(location))
}

fn cgroup_name(s: &KtRun) -> String {
    s.cgroup
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The report group of this test's cgroup.
fn report_group(s: &KtRun) -> serde_json::Value {
    let out = s.kt(KT, &["--output", "json", "egress", "report"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = cgroup_name(s);
    r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["cgroup"].as_str().is_some_and(|c| c.ends_with(&name)))
        .cloned()
        .unwrap_or_else(|| panic!("no report group for {name}: {r}"))
}

#[test]
fn enforce_refuses_what_is_not_allowed_with_an_event_and_lets_the_rest_through() {
    if skip() {
        return;
    }
    let mut s = KtRun::start(
        KT,
        "egress-enforce",
        41,
        "",
        "  egress:\n    mode: enforce\n    allow: [\"198.51.100.0/24:443\", \"2001:db8:1::/48\"]\n    resolvers: [\"192.0.2.53\"]\n",
    );
    // Not on the list: refused at connect, before any packet.
    let refused = s.job(&mut isolated(&["tcp", "192.0.2.1:443"]));
    assert_eq!(refused.field("connect_error"), Some(EPERM), "{refused:?}");
    let refused6 = s.job(&mut isolated(&["tcp", "[2001:db8:2::1]:443"]));
    assert_eq!(refused6.field("connect_error"), Some(EPERM), "{refused6:?}");
    // On the list (a CIDR on one port, a v6 CIDR on every port): let
    // through, and then unreachable inside the empty namespace.
    let allowed = s.job(&mut isolated(&["tcp", "198.51.100.7:443"]));
    assert_eq!(
        allowed.field("connect_error"),
        Some(ENETUNREACH),
        "{allowed:?}"
    );
    let allowed6 = s.job(&mut isolated(&["tcp", "[2001:db8:1::9]:22"]));
    assert_eq!(
        allowed6.field("connect_error"),
        Some(ENETUNREACH),
        "{allowed6:?}"
    );
    // The allowed CIDR on another port is not allowed.
    let other_port = s.job(&mut isolated(&["tcp", "198.51.100.7:8443"]));
    assert_eq!(
        other_port.field("connect_error"),
        Some(EPERM),
        "{other_port:?}"
    );
    // Loopback is never checked.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let local = listener.local_addr().unwrap().to_string();
    let mut direct = Command::new(CLIENT);
    direct.args(["tcp", &local]);
    let mut child = direct
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut go = child.stdin.take().unwrap();
    let pid = s.cgroup.adopt(child).unwrap();
    std::io::Write::write_all(&mut go, b"go\n").unwrap();
    drop(go);
    let accepted =
        guard_tests::process::wait_until("the loopback connection", || listener.accept().ok());
    std::io::Write::write_all(&mut &accepted.0, b"loopback-ok\n").unwrap();
    let out = s.cgroup.wait(pid).unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("peer="), "{out}");
    // A provider still goes through kt (captured, not refused).
    let provider_ip = s.provider_ip.clone();
    let call = s.job(&mut curl_job(&s, &provider_ip, false));
    assert!(call.status.success(), "{call:?}\nkt log:\n{}", s.log());
    let seen = s.provider.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        &format!("Bearer {MANAGED_KEY}")
    );

    // Refusals are events naming the process and the destination.
    let e = s.wait_event(KT, "the refusal event", |e| {
        guard_rule(e) == Some("egress-refused") && guard_location(e) == Some("tcp 192.0.2.1:443")
    });
    assert_eq!(e["decision"], "block", "{e}");
    assert_eq!(e["client"]["pid"], refused.pid, "{e}");
    assert!(
        e["client"]["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with(&cgroup_name(&s))),
        "{e}"
    );
    s.wait_event(KT, "the IPv6 refusal event", |e| {
        guard_location(e) == Some("tcp [2001:db8:2::1]:443")
    });
    s.wait_event(KT, "the other-port refusal event", |e| {
        guard_location(e) == Some("tcp 198.51.100.7:8443")
    });
    let events = s.events(KT);
    // What was allowed is not recorded in enforce.
    assert!(
        events
            .iter()
            .all(|e| !guard_location(e).is_some_and(|l| l.contains("198.51.100.7:443"))),
        "{events:?}"
    );
}

#[test]
fn enforce_reaches_dns_only_through_the_configured_resolvers_and_no_unresolved_provider_edge() {
    if skip() {
        return;
    }
    let mut s = KtRun::start(
        KT,
        "egress-dns",
        42,
        "",
        // Even an allowlist entry for every address does not open DNS.
        "  egress:\n    mode: enforce\n    allow: [\"198.51.100.0/24\"]\n    resolvers: [\"192.0.2.53\"]\n",
    );
    let dns = s.job(&mut isolated(&["udp", "198.51.100.53:53"]));
    assert_eq!(dns.field("udp_error"), Some(EPERM), "{dns:?}");
    assert_eq!(dns.field("udp_connect_error"), Some(EPERM), "{dns:?}");
    let dot = s.job(&mut isolated(&["tcp", "198.51.100.53:853"]));
    assert_eq!(dot.field("connect_error"), Some(EPERM), "{dot:?}");
    // DoH is HTTPS to an address not on the list.
    let doh = s.job(&mut isolated(&["tcp", "192.0.2.9:443"]));
    assert_eq!(doh.field("connect_error"), Some(EPERM), "{doh:?}");
    // The configured resolver is reachable (then unreachable in the empty
    // namespace).
    let ok = s.job(&mut isolated(&["udp", "192.0.2.53:53"]));
    assert_eq!(ok.field("udp_error"), Some(ENETUNREACH), "{ok:?}");
    // A provider name the job resolved itself to an edge address kt never
    // resolved: not captured (not in the provider prefixes), and refused.
    let edge = s.job(&mut curl_job(&s, "192.0.2.77", true));
    assert_eq!(
        edge.status.code(),
        Some(7),
        "curl should fail to connect: {edge:?}"
    );
    let e = s.wait_event(KT, "the provider-edge refusal", |e| {
        guard_location(e) == Some("tcp 192.0.2.77:443")
    });
    assert_eq!(e["client"]["pid"], edge.pid, "{e}");
    assert!(s.provider.requests().is_empty());
    s.wait_event(KT, "the DNS refusal", |e| {
        guard_rule(e) == Some("egress-refused") && guard_location(e) == Some("udp 198.51.100.53:53")
    });
}

#[test]
fn allowlisted_host_names_are_resolved_by_kt_and_name_what_the_report_suggests() {
    if skip() {
        return;
    }
    // Names exist only in kt's private /etc/hosts (its mount namespace).
    let hosts = "198.51.100.20 allowed.test\n198.51.100.30 named.test\n";
    let mut s = KtRun::start_with_hosts(
        KT,
        "egress-names",
        46,
        "",
        "  egress:\n    mode: enforce\n    allow: [\"allowed.test:443\", named.test]\n    resolvers: []\n",
        hosts,
    );
    let ok = s.job(&mut isolated(&["tcp", "198.51.100.20:443"]));
    assert_eq!(ok.field("connect_error"), Some(ENETUNREACH), "{ok:?}");
    let any_port = s.job(&mut isolated(&["tcp", "198.51.100.30:5432"]));
    assert_eq!(
        any_port.field("connect_error"),
        Some(ENETUNREACH),
        "{any_port:?}"
    );
    let other_port = s.job(&mut isolated(&["tcp", "198.51.100.20:22"]));
    assert_eq!(
        other_port.field("connect_error"),
        Some(EPERM),
        "{other_port:?}"
    );
    let e = s.wait_event(KT, "the refusal naming the host", |e| {
        guard_location(e) == Some("tcp 198.51.100.20:22 name=allowed.test")
    });
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("allowed.test")),
        "{e}"
    );
    // The report suggests the name kt knows for the address.
    let g = report_group(&s);
    assert_eq!(g["allow"], serde_json::json!(["allowed.test:22"]), "{g}");
}

#[test]
fn audit_records_every_destination_and_the_report_suggests_exactly_them() {
    if skip() {
        return;
    }
    let mut s = KtRun::start(KT, "egress-audit", 43, "", "  egress:\n    mode: audit\n");
    // Nothing is refused: each ends unreachable inside the empty namespace.
    let a = s.job(&mut isolated(&["tcp", "192.0.2.1:443"]));
    assert_eq!(a.field("connect_error"), Some(ENETUNREACH), "{a:?}");
    let b = s.job(&mut isolated(&["tcp", "203.0.113.9:8443"]));
    assert_eq!(b.field("connect_error"), Some(ENETUNREACH), "{b:?}");
    let c = s.job(&mut isolated(&["udp", "192.0.2.2:53"]));
    assert_eq!(c.field("udp_error"), Some(ENETUNREACH), "{c:?}");
    let d = s.job(&mut isolated(&["tcp", "[2001:db8::5]:443"]));
    assert_eq!(d.field("connect_error"), Some(ENETUNREACH), "{d:?}");
    for loc in [
        "tcp 192.0.2.1:443",
        "tcp 203.0.113.9:8443",
        "udp 192.0.2.2:53",
        "tcp [2001:db8::5]:443",
    ] {
        let e = s.wait_event(KT, loc, |e| {
            guard_rule(e) == Some("egress-audit") && guard_location(e) == Some(loc)
        });
        assert_eq!(e["decision"], "allow", "{e}");
    }
    let events = s.events(KT);
    assert!(
        egress_event(&events, "egress-refused", "tcp 192.0.2.1:443").is_none(),
        "audit refused something: {events:?}"
    );
    let g = report_group(&s);
    assert_eq!(
        g["allow"],
        serde_json::json!([
            "192.0.2.1/32:443",
            "203.0.113.9/32:8443",
            "[2001:db8::5]/128:443"
        ]),
        "{g}"
    );
    assert_eq!(g["resolvers"], serde_json::json!(["192.0.2.2"]), "{g}");
    // Human output: a config snippet with the same entries.
    let out = s.kt(KT, &["egress", "report"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mode: enforce") && text.contains("- \"192.0.2.1/32:443\""),
        "{text}"
    );
}
