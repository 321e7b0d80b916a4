//! `capture.proxies`, `capture.egress` and `gateway.upstream_proxy`: the
//! model and the pure parsers of their entries (the loader in `load`
//! reports errors with positions).

use std::net::IpAddr;

use super::load::{is_host_name, parse_prefix};
use super::model::IpPrefix;

/// A proxy's address: `host:port` (a name or an IP literal).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProxyAddr {
    /// Host name (lower case) or IP literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for ProxyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `capture.egress.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EgressMode {
    /// `off`: nothing checked or recorded (the default).
    #[default]
    Off,
    /// `audit`: every outbound TCP/UDP destination of the captured cgroup
    /// is recorded; nothing is refused.
    Audit,
    /// `enforce`: what is not allowed, not a provider and not loopback is
    /// refused at connect (EPERM) and recorded.
    Enforce,
}

impl EgressMode {
    /// The name written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::Off => "off",
            EgressMode::Audit => "audit",
            EgressMode::Enforce => "enforce",
        }
    }
}

/// What an allow entry names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowDest {
    /// A host name kt resolves (and re-resolves like `capture.hosts`).
    Host(String),
    /// An address or CIDR.
    Prefix(IpPrefix),
}

/// One `capture.egress.allow` entry: `host`, `host:port`, `CIDR`, `CIDR:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowEntry {
    /// The destination.
    pub dest: AllowDest,
    /// Only this port; `None`: every port.
    pub port: Option<u16>,
}

/// `capture.egress`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    /// `mode` (default off).
    pub mode: EgressMode,
    /// `allow`.
    pub allow: Vec<AllowEntry>,
    /// `resolvers`: the only addresses reachable on 53/853 under
    /// `enforce`; `None`: the nameservers of /etc/resolv.conf at start.
    pub resolvers: Option<Vec<IpAddr>>,
}

fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{p}` is not a port (1 to 65535)"))
}

/// Splits `host:port`, `[v6]:port` or a bare host / address (port `None`).
fn split_port(s: &str) -> Result<(&str, Option<u16>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{s}` has `[` without `]`"))?;
        return match after {
            "" => Ok((host, None)),
            a => match a.strip_prefix(':') {
                Some(p) => Ok((host, Some(parse_port(p)?))),
                None => Err(format!("unexpected `{a}` after `]`")),
            },
        };
    }
    match s.matches(':').count() {
        0 => Ok((s, None)),
        1 => {
            let (h, p) = s.split_once(':').unwrap_or((s, ""));
            Ok((h, Some(parse_port(p)?)))
        }
        // A bare IPv6 address.
        _ => Ok((s, None)),
    }
}

/// `host:port` (also `[v6]:port`; an `http://` in front and a `/` after are
/// accepted, so the value of `HTTPS_PROXY` fits). The port is required.
pub fn parse_proxy_addr(s: &str) -> Result<ProxyAddr, String> {
    let t = s.trim();
    let t = t.strip_prefix("http://").unwrap_or(t);
    if t.starts_with("https://") || t.contains("://") {
        return Err(format!(
            "`{s}`: only plain http:// proxies can be read (a TLS connection to the proxy hides the CONNECT request)"
        ));
    }
    let t = t.trim_end_matches('/');
    // user:password@ in a proxy URL: never kept.
    let t = t.rsplit_once('@').map_or(t, |(_, h)| h);
    let (host, port) = split_port(t)?;
    let port =
        port.ok_or_else(|| format!("`{s}` has no port (write host:port, e.g. proxy.corp:3128)"))?;
    let host = host.to_ascii_lowercase();
    if host.parse::<IpAddr>().is_err() && !is_host_name(&host) {
        return Err(format!("`{host}` is not a host name or IP address"));
    }
    Ok(ProxyAddr { host, port })
}

/// A proxy URL from the environment (`HTTPS_PROXY`, `https_proxy`): like
/// [`parse_proxy_addr`], with port 80 when none is given (the URL default).
pub fn parse_proxy_url(s: &str) -> Result<ProxyAddr, String> {
    let t = s.trim().trim_end_matches('/');
    let bare = t.strip_prefix("http://").unwrap_or(t);
    let bare = bare.rsplit_once('@').map_or(bare, |(_, h)| h);
    match split_port(bare) {
        Ok((_, None)) if !bare.contains("://") => parse_proxy_addr(&format!("{bare}:80")),
        _ => parse_proxy_addr(t),
    }
}

/// `host`, `host:port`, `CIDR`, `CIDR:port` (an address is a /32 or /128;
/// IPv6 with a port in brackets: `[2001:db8::]/32:443` or `[2001:db8::1]:443`).
pub fn parse_allow(s: &str) -> Result<AllowEntry, String> {
    let t = s.trim();
    // CIDR with a port: the port follows the length.
    if let Some((addr, rest)) = t.split_once('/') {
        let (len, port) = match rest.split_once(':') {
            Some((l, p)) => (l, Some(parse_port(p)?)),
            None => (rest, None),
        };
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let prefix = parse_prefix(&format!("{addr}/{len}"))?;
        return Ok(AllowEntry {
            dest: AllowDest::Prefix(prefix),
            port,
        });
    }
    let (host, port) = split_port(t)?;
    if host.parse::<IpAddr>().is_ok() {
        return Ok(AllowEntry {
            dest: AllowDest::Prefix(parse_prefix(host)?),
            port,
        });
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if !is_host_name(&host) {
        return Err(format!("`{host}` is not a host name, address or CIDR"));
    }
    Ok(AllowEntry {
        dest: AllowDest::Host(host),
        port,
    })
}

/// Whether `NO_PROXY` (comma or space separated: `*`, `host`, `.domain`,
/// `domain` also for its subdomains, IP literals) exempts `host`.
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    no_proxy
        .split([',', ' '])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|e| {
            let e = e.to_ascii_lowercase();
            if e == "*" {
                return true;
            }
            // A port in the entry is ignored: kt's upstreams are on one port each.
            let e = match split_port(&e) {
                Ok((h, _)) => h.to_string(),
                Err(_) => e,
            };
            let e = e.trim_start_matches("*.").trim_start_matches('.');
            host == e || host.ends_with(&format!(".{e}"))
        })
}

/// The proxy kt's own upstream connections use for `host`: the configured
/// one, else `HTTPS_PROXY`/`https_proxy` of kt's environment unless
/// `NO_PROXY`/`no_proxy` exempts `host`. `env` reads a variable.
pub fn upstream_proxy_for(
    configured: Option<&ProxyAddr>,
    host: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<ProxyAddr> {
    let no_proxy = env("NO_PROXY")
        .or_else(|| env("no_proxy"))
        .unwrap_or_default();
    if no_proxy_matches(&no_proxy, host) {
        return None;
    }
    if let Some(p) = configured {
        return Some(p.clone());
    }
    let v = env("HTTPS_PROXY").or_else(|| env("https_proxy"))?;
    if v.trim().is_empty() {
        return None;
    }
    parse_proxy_url(&v).ok()
}

/// Proxy variables a job may inherit.
pub const PROXY_VARS: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// `VAR=value` pairs of an /etc/environment text (quotes and `export` removed).
pub fn environment_file_vars(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            Some((
                k.trim().to_string(),
                v.trim().trim_matches(|c| c == '"' || c == '\'').to_string(),
            ))
        })
        .collect()
}

/// Warnings for proxy variables set (`(where, VAR, value)`) while
/// `capture.proxies` declares none: jobs using that proxy would reach the
/// providers through it, unseen. Values are shown as `host:port` only (a
/// proxy URL may carry credentials).
pub fn undeclared_proxy_warnings(
    declared: &[ProxyAddr],
    found: &[(String, String, String)],
) -> Vec<String> {
    if !declared.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (place, var, value) in found {
        if !PROXY_VARS.contains(&var.as_str()) || value.trim().is_empty() {
            continue;
        }
        let shown = parse_proxy_url(value)
            .map_or_else(|_| "an unreadable value".to_string(), |p| p.to_string());
        out.push(format!(
            "{var} is set in {place} ({shown}) but capture.proxies is empty: jobs that use this proxy \
             reach the providers through it and kt never sees them; declare it: `capture: {{ proxies: [\"{shown}\"] }}`"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_variables_warn_only_without_declared_proxies() {
        let vars =
            environment_file_vars("# x\nPATH=/bin\nHTTPS_PROXY=\"http://u:pw@proxy.corp:3128\"\n");
        let found: Vec<_> = vars
            .into_iter()
            .map(|(k, v)| ("/etc/environment".to_string(), k, v))
            .collect();
        let w = undeclared_proxy_warnings(&[], &found);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("HTTPS_PROXY") && w[0].contains("proxy.corp:3128"),
            "{w:?}"
        );
        assert!(!w[0].contains("pw"), "{w:?}");
        let declared = [parse_proxy_addr("proxy.corp:3128").unwrap()];
        assert!(undeclared_proxy_warnings(&declared, &found).is_empty());
    }

    #[test]
    fn proxy_addresses_need_a_port_and_drop_credentials() {
        let p = parse_proxy_addr("Proxy.Corp:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        let p = parse_proxy_addr("http://user:secret@10.0.0.5:8080/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.5", 8080));
        assert!(!format!("{p:?}").contains("secret"));
        let p = parse_proxy_addr("[::1]:3128").unwrap();
        assert_eq!(p.to_string(), "[::1]:3128");
        assert!(parse_proxy_addr("proxy.corp").is_err());
        assert!(parse_proxy_addr("https://proxy.corp:443").is_err());
        assert_eq!(parse_proxy_url("http://proxy.corp").unwrap().port, 80);
    }

    #[test]
    fn allow_entries_cover_hosts_addresses_cidrs_and_ports() {
        let e = parse_allow("pypi.org").unwrap();
        assert_eq!(e.dest, AllowDest::Host("pypi.org".into()));
        assert_eq!(e.port, None);
        let e = parse_allow("github.com:22").unwrap();
        assert_eq!(e.port, Some(22));
        let e = parse_allow("10.0.0.0/8:5432").unwrap();
        assert_eq!(
            e.dest,
            AllowDest::Prefix(IpPrefix {
                addr: "10.0.0.0".parse().unwrap(),
                len: 8
            })
        );
        assert_eq!(e.port, Some(5432));
        let e = parse_allow("192.0.2.7").unwrap();
        assert!(matches!(e.dest, AllowDest::Prefix(p) if p.len == 32));
        let e = parse_allow("[2001:db8::]/32:443").unwrap();
        assert!(matches!(e.dest, AllowDest::Prefix(p) if p.len == 32));
        assert_eq!(e.port, Some(443));
        let e = parse_allow("2001:db8::1").unwrap();
        assert!(matches!(e.dest, AllowDest::Prefix(p) if p.len == 128));
        assert!(parse_allow("10.0.0.1/8").is_err());
        assert!(parse_allow("pypi.org:0").is_err());
        assert!(parse_allow("bad host").is_err());
    }

    #[test]
    fn no_proxy_and_the_environment_pick_the_upstream_proxy() {
        assert!(no_proxy_matches(
            "localhost,.corp.example",
            "api.corp.example"
        ));
        assert!(no_proxy_matches("corp.example", "corp.example"));
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("corp.example", "notcorp.example"));
        let env = |k: &str| match k {
            "https_proxy" => Some("http://10.9.9.9:3128".to_string()),
            "NO_PROXY" => Some("internal.example".to_string()),
            _ => None,
        };
        let p = upstream_proxy_for(None, "api.openai.com", &env).unwrap();
        assert_eq!(p.to_string(), "10.9.9.9:3128");
        assert!(upstream_proxy_for(None, "internal.example", &env).is_none());
        let configured = ProxyAddr {
            host: "proxy.corp".into(),
            port: 8080,
        };
        let p = upstream_proxy_for(Some(&configured), "api.openai.com", &env).unwrap();
        assert_eq!(p, configured);
        assert!(upstream_proxy_for(None, "x", &|_| None).is_none());
    }
}
