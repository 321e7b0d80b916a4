//! The typed configuration: the seed's sections plus the optional sections
//! the guard adds. Every field has its default here, so the seed file alone
//! is a complete config. Parsing and validation live in `load.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::provider::Provider;

/// A whole, validated configuration file.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file this was loaded from (for messages).
    pub source: PathBuf,
    /// `pack`: the policy pack's identity.
    pub pack: Pack,
    /// `providers`: routing, fallback and the ordered targets.
    pub providers: Providers,
    /// `policies.chain`: policy names in the order they run (default when
    /// `policies.chain` is absent: dlp-filter, audit-logger; `[]` means none).
    pub chain: Vec<PolicyKind>,
    /// `policy.dlp-filter`, when present; defaults when only the chain names it.
    pub dlp: Option<DlpFilter>,
    /// `policy.audit-logger`, when present; defaults when only the chain names it.
    pub audit: Option<AuditLogger>,
    /// `gateway`: listeners, timeouts and limits.
    pub gateway: GatewaySettings,
    /// `capture`: what the eBPF programs send to the gateway.
    pub capture: Capture,
    /// `secrets`: a central secret store for `store:` references.
    pub secrets: super::SecretsSettings,
}

/// `pack` (default when absent: the file's stem as name, version `0.0.0`, enabled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pack {
    /// `pack.name`.
    pub name: String,
    /// `pack.version`.
    pub version: String,
    /// `pack.enabled` (a disabled pack is a validation error: nothing would run).
    pub enabled: bool,
}

/// `providers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Providers {
    /// `providers.routing.strategy`.
    pub strategy: RoutingStrategy,
    /// `providers.fallback.enabled` (also accepted as `providers.routing.fallback.enabled`;
    /// default true, and a `fallback` section without `enabled` means true).
    pub fallback: bool,
    /// `providers.targets`, in order.
    pub targets: Vec<Target>,
}

/// `providers.routing.strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RoutingStrategy {
    /// Try targets in the order written, moving on when one fails.
    #[default]
    Ordered,
}

/// One entry of `providers.targets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `id`, unique in the file.
    pub id: String,
    /// `provider`.
    pub provider: Provider,
    /// `model`: when set, the model sent upstream.
    pub model: Option<String>,
    /// `required` (default true): an unresolvable secret stops startup.
    pub required: bool,
    /// `secret_key_ref`: where the managed key comes from.
    pub secret_key_ref: SecretKeyRef,
    /// `base_url`: where requests go (default: the provider's official endpoint).
    pub base_url: Option<String>,
}

/// `secret_key_ref`: a name or a path, never a value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SecretKeyRef {
    /// `env: NAME`: the guard's own environment.
    Env(String),
    /// `store: NAME`: the guard's secret store, then the keychain.
    Store(String),
    /// `file: PATH`: a file holding only the key (written by Vault Agent, a
    /// Kubernetes secret volume, systemd `LoadCredential`). Absolute: a
    /// relative path in the config file is resolved against the config
    /// file's directory when it is loaded.
    File(PathBuf),
}

impl SecretKeyRef {
    /// The referenced name: the secret's name, or the file's path. Events
    /// name a presented managed key by this.
    pub fn name(&self) -> std::borrow::Cow<'_, str> {
        match self {
            SecretKeyRef::Env(n) | SecretKeyRef::Store(n) => std::borrow::Cow::Borrowed(n),
            SecretKeyRef::File(p) => p.to_string_lossy(),
        }
    }

    /// `env`, `store` or `file`, as written in config files.
    pub fn kind(&self) -> &'static str {
        match self {
            SecretKeyRef::Env(_) => "env",
            SecretKeyRef::Store(_) => "store",
            SecretKeyRef::File(_) => "file",
        }
    }
}

impl std::fmt::Display for SecretKeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind(), self.name())
    }
}

/// A policy that can appear in `policies.chain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// `dlp-filter`.
    DlpFilter,
    /// `audit-logger`.
    AuditLogger,
}

impl PolicyKind {
    /// The name as written in config files.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::DlpFilter => "dlp-filter",
            PolicyKind::AuditLogger => "audit-logger",
        }
    }
}

/// `policy.dlp-filter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DlpFilter {
    /// `detect_patterns`: regexes (already checked to compile).
    pub detect_patterns: Vec<String>,
    /// `blocked_terms`: phrases matched after normalisation.
    pub blocked_terms: Vec<String>,
    /// `action` (default block).
    pub action: DlpAction,
    /// `fuzzy_matching` (default false).
    pub fuzzy_matching: bool,
    /// `max_distance` (default 1, at most `MAX_FUZZY_DISTANCE`).
    pub max_distance: u8,
    /// `builtin_rules` (default true): the built-in provider/platform key pack.
    pub builtin_rules: bool,
}

impl Default for DlpFilter {
    /// What a chain entry `dlp-filter` runs with when `policy.dlp-filter` is absent.
    fn default() -> Self {
        DlpFilter {
            detect_patterns: Vec::new(),
            blocked_terms: Vec::new(),
            action: DlpAction::Block,
            fuzzy_matching: false,
            max_distance: 1,
            builtin_rules: true,
        }
    }
}

/// Largest accepted `max_distance`.
pub const MAX_FUZZY_DISTANCE: u8 = 3;

/// `policy.dlp-filter.action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DlpAction {
    /// Refuse the request.
    #[default]
    Block,
    /// Replace the match before forwarding.
    Redact,
    /// Forward and record.
    Audit,
}

/// `policy.audit-logger`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditLogger {
    /// `max_events` (default 1,000,000): oldest-first pruning above this.
    pub max_events: u64,
    /// `on_store_failure` (default `log`): what to do when events cannot be written.
    pub on_store_failure: StoreFailure,
    /// `sinks` (default none): where events go besides the SQLite store.
    pub sinks: Vec<SinkConfig>,
}

impl Default for AuditLogger {
    fn default() -> Self {
        AuditLogger {
            max_events: 1_000_000,
            on_store_failure: StoreFailure::Log,
            sinks: Vec::new(),
        }
    }
}

/// One entry of `policy.audit-logger.sinks`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkConfig {
    /// `type` and its options.
    pub kind: SinkKind,
    /// `on_failure` (default `log`): `refuse` refuses requests while this
    /// sink cannot take events.
    pub on_failure: StoreFailure,
    /// `queue` (default 10,000): events waiting for this sink at most;
    /// beyond it they are dropped and counted, never waited for.
    pub queue: usize,
}

impl SinkConfig {
    /// The sink's name in logs, metrics labels and drop events:
    /// `file:PATH`, `stdout`, `syslog:ADDRESS`.
    pub fn name(&self) -> String {
        match &self.kind {
            SinkKind::File { path, .. } => format!("file:{}", path.display()),
            SinkKind::Stdout => "stdout".into(),
            SinkKind::Syslog { address, .. } => format!("syslog:{address}"),
        }
    }
}

/// `type` of a sink and the options that go with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// `type: file`: JSON Lines appended to `path`.
    File {
        /// `path` (absolute; relative to the config file's directory otherwise).
        path: PathBuf,
        /// `rotate_bytes`: rotate before the file would grow past this.
        rotate_bytes: Option<u64>,
        /// `rotate_age`: rotate a file opened longer ago than this.
        rotate_age: Option<Duration>,
        /// `max_files` (default 5): rotated files kept (`PATH.1` newest).
        max_files: u32,
    },
    /// `type: stdout`: JSON Lines on kt's standard output.
    Stdout,
    /// `type: syslog`: RFC 5424 messages, the event's JSON as MSG.
    Syslog {
        /// `address` (default `unix:///dev/log`).
        address: SyslogAddress,
        /// `facility` (default `local0`), as its number (0-23).
        facility: u8,
    },
}

/// Where a syslog sink sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyslogAddress {
    /// `unix:///dev/log`: the local daemon's datagram socket.
    Unix(PathBuf),
    /// `udp://HOST:PORT`: one datagram per event (RFC 5426).
    Udp(String),
    /// `tcp://HOST:PORT`: octet-counted frames (RFC 6587).
    Tcp(String),
}

impl std::fmt::Display for SyslogAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyslogAddress::Unix(p) => write!(f, "unix://{}", p.display()),
            SyslogAddress::Udp(a) => write!(f, "udp://{a}"),
            SyslogAddress::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// `gateway.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GatewayMode {
    /// Swap keys, block by policy (the default).
    #[default]
    Enforce,
    /// Record only: the client's own credential goes upstream, nothing is
    /// blocked or rewritten.
    Observe,
}

/// What kt does with one kind of presented credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialAction {
    /// Throw it away and send the target's managed key.
    Swap,
    /// Forward the client's own credential (still scanned and recorded).
    Pass,
    /// Refuse the request.
    Block,
}

impl CredentialAction {
    /// `swap`, `pass` or `block`.
    pub fn label(self) -> &'static str {
        match self {
            CredentialAction::Swap => "swap",
            CredentialAction::Pass => "pass",
            CredentialAction::Block => "block",
        }
    }
}

/// `gateway.credentials`: the action per kind of presented credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CredentialPolicy {
    /// `api_key` (default swap): an API key of the provider called, or a
    /// key kt does not recognise (a legacy key).
    pub api_key: CredentialAction,
    /// `oauth` (default pass): an Anthropic OAuth/subscription token
    /// (`sk-ant-oat01-…`, Claude Code on a developer machine). Never swap
    /// by default: that would move a subscription's traffic onto the
    /// organisation's API bill.
    pub oauth: CredentialAction,
    /// `none` (default swap): no credential at all (`pass` is not allowed:
    /// there is nothing to pass).
    pub none: CredentialAction,
    /// `other_provider` (default block): a key of another provider (a Groq
    /// key sent to OpenAI).
    pub other_provider: CredentialAction,
    /// `entra` (default pass; `swap` is not allowed): a Microsoft Entra
    /// ID token sent to Azure OpenAI (`Authorization: Bearer <JWT>`), a
    /// person's or workload's own identity.
    pub entra: CredentialAction,
    /// `sigv4` (default block; `swap` is not allowed): an AWS SigV4-signed
    /// request (`Authorization: AWS4-HMAC-SHA256 ...`), signed with the
    /// job's own IAM credentials over the request itself.
    pub sigv4: CredentialAction,
}

impl Default for CredentialPolicy {
    fn default() -> Self {
        CredentialPolicy {
            api_key: CredentialAction::Swap,
            oauth: CredentialAction::Pass,
            none: CredentialAction::Swap,
            other_provider: CredentialAction::Block,
            entra: CredentialAction::Pass,
            sigv4: CredentialAction::Block,
        }
    }
}

/// `policy.audit-logger.on_store_failure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StoreFailure {
    /// Keep serving by policy, log loudly.
    #[default]
    Log,
    /// Refuse traffic while events cannot be recorded.
    Refuse,
}

/// `gateway`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewaySettings {
    /// `listen` (default 127.0.0.1:8787): explicit clients (base URL, CONNECT).
    pub listen: SocketAddr,
    /// `capture_listen` (default 127.0.0.1:709): redirected connections. A
    /// port below 1024, so while kt is down (its programs pinned) no
    /// unprivileged process can bind it and receive them.
    pub capture_listen: SocketAddr,
    /// `capture_listen6` (default `[::1]:709`): redirected IPv6 connections.
    pub capture_listen6: Option<SocketAddr>,
    /// `connect_timeout` (default 5s).
    pub connect_timeout: Duration,
    /// `first_byte_timeout` (default 60s): upstream response headers.
    pub first_byte_timeout: Duration,
    /// `idle_timeout` (default 120s): the longest gap inside a streamed body.
    pub idle_timeout: Duration,
    /// `max_body_bytes` (default 16 MiB): larger request bodies get 413.
    pub max_body_bytes: u64,
    /// `max_retry_after` (default 10s): longest `Retry-After` honoured before falling back.
    pub max_retry_after: Duration,
    /// `connect_allow` (default none): host names (`*.` for subdomains) that
    /// CONNECT clients may tunnel to on 443 besides the providers. Never
    /// an internal address, whatever the name resolves to.
    pub connect_allow: Vec<String>,
    /// `max_connections` (default 4096): client connections served at once,
    /// over all listeners. When full, the oldest connection that has not
    /// sent a request yet is closed to make room; if there is none, the new
    /// connection is closed.
    pub max_connections: usize,
    /// `max_connections_per_uid` (default 512): connections one user id may
    /// hold at once, so one job cannot take the whole budget.
    pub max_connections_per_uid: usize,
    /// `body_timeout` (default 60s): longest time to receive a request body.
    pub body_timeout: Duration,
    /// `max_buffered_bytes` (default 256 MiB): request bodies held at once
    /// over all requests; past it a request gets 503 instead of kt's memory
    /// growing.
    pub max_buffered_bytes: u64,
    /// `cooldown_after` (default 3; 0 turns it off): consecutive failures
    /// (connect, TLS, timeout, 500/502/503/504) after which a target is
    /// skipped for `cooldown`.
    pub cooldown_after: u32,
    /// `cooldown` (default 30s): how long a failing target is skipped.
    pub cooldown: Duration,
    /// `probe_interval` (default 0: off): how often the running gateway
    /// proves each target's key with its provider's unbilled probe. Off by
    /// default: every host of a fleet would call every provider on that
    /// beat, and a rate-limited probe is still a request.
    pub probe_interval: Duration,
    /// `clients` (default: anyone on this host): who may spend managed keys.
    pub clients: Option<ClientAllow>,
    /// `allow_remote_clients` (default false): `listen` may be a
    /// non-loopback address. Off, such an address is a config error: the
    /// explicit listener hands out managed keys to whoever reaches it.
    pub allow_remote_clients: bool,
    /// `mode` (default `enforce`): `observe` records everything but
    /// forwards each client's own credential and blocks nothing (DLP
    /// findings are recorded as would-block): map the legacy keys first,
    /// enforce later.
    pub mode: GatewayMode,
    /// `credentials`: what to do with each kind of credential a client
    /// presents.
    pub credentials: CredentialPolicy,
    /// `metrics` (default off): where the Prometheus endpoint listens
    /// (`GET /metrics`), e.g. `127.0.0.1:9787`; loopback unless
    /// `allow_remote_metrics`.
    pub metrics: Option<SocketAddr>,
    /// `allow_remote_metrics` (default false): `metrics` may be a
    /// non-loopback address.
    pub allow_remote_metrics: bool,
    /// `upstream_proxy` (`http://host:port`): kt's own upstream connections
    /// go through it by CONNECT. Without it, `HTTPS_PROXY`/`NO_PROXY` of
    /// kt's environment apply.
    pub upstream_proxy: Option<super::egress::ProxyAddr>,
    /// `proxy_listen`: where connections to a declared proxy are sent
    /// (default 127.0.0.1:710, privileged like the capture listener; an
    /// IPv6 one listens on `[::1]` at the same port when it can).
    pub proxy_listen: SocketAddr,
}

/// `gateway.clients`: processes allowed to spend managed keys. A request
/// from a process that matches neither list (or whose process kt cannot
/// tell) is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientAllow {
    /// `uids`: user ids.
    pub uids: Vec<u32>,
    /// `cgroups`: cgroup-v2 paths; a process in one of them or below matches.
    pub cgroups: Vec<String>,
}

impl ClientAllow {
    /// Whether a process with `uid` in `cgroup` may spend managed keys.
    pub fn allows(&self, uid: Option<u32>, cgroup: Option<&str>) -> bool {
        uid.is_some_and(|u| self.uids.contains(&u))
            || cgroup.is_some_and(|c| {
                self.cgroups.iter().any(|a| {
                    let a = a.trim_end_matches('/');
                    c == a || c.starts_with(&format!("{a}/")) || a.is_empty()
                })
            })
    }
}

/// Default port of the capture listeners: privileged (below 1024), so no
/// unprivileged process can take it over while kt is not running.
pub const CAPTURE_PORT: u16 = 709;

/// Default port of the proxy listener (connections to a declared proxy):
/// privileged for the same reason; they carry proxy credentials.
pub const PROXY_PORT: u16 = 710;

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            capture_listen: SocketAddr::from(([127, 0, 0, 1], CAPTURE_PORT)),
            capture_listen6: Some(SocketAddr::from((
                std::net::Ipv6Addr::LOCALHOST,
                CAPTURE_PORT,
            ))),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(120),
            max_body_bytes: 16 * 1024 * 1024,
            max_retry_after: Duration::from_secs(10),
            connect_allow: Vec::new(),
            max_connections: 4096,
            max_connections_per_uid: 512,
            body_timeout: Duration::from_secs(60),
            max_buffered_bytes: 256 * 1024 * 1024,
            cooldown_after: 3,
            cooldown: Duration::from_secs(30),
            probe_interval: Duration::ZERO,
            clients: None,
            allow_remote_clients: false,
            mode: GatewayMode::Enforce,
            credentials: CredentialPolicy::default(),
            metrics: None,
            allow_remote_metrics: false,
            upstream_proxy: None,
            proxy_listen: SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
        }
    }
}

/// An IP prefix (`10.0.0.0/8`, `2001:db8::/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    /// Network address.
    pub addr: std::net::IpAddr,
    /// Prefix length in bits.
    pub len: u8,
}

/// `capture`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// `enabled` (default true).
    pub enabled: bool,
    /// `cgroup`: scope; default (None) is the cgroup2 mount.
    pub cgroup: Option<PathBuf>,
    /// `hosts`: default (None) is the hosts of the providers in use.
    pub hosts: Option<Vec<String>>,
    /// `cidrs`: extra prefixes.
    pub cidrs: Vec<IpPrefix>,
    /// `ports` (default `[443]`).
    pub ports: Vec<u16>,
    /// `scope` (default `provider`): which connections to the ports go
    /// through kt.
    pub scope: CaptureScope,
    /// `containers`: connections from other network namespaces (containers
    /// on bridges); default off (refused).
    pub containers: Containers,
    /// `providers` (default `routed`): whose hosts are captured when
    /// `hosts` is not given.
    pub providers: CaptureProviders,
    /// `proxies`: HTTP proxies the captured processes use; connections to
    /// them go through kt, which decides per CONNECT authority.
    pub proxies: Vec<super::egress::ProxyAddr>,
    /// `egress`: strict egress (off, audit, enforce) and its allowlist.
    pub egress: super::egress::Egress,
}

/// `capture.providers`: which catalog providers' hosts are captured by
/// default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CaptureProviders {
    /// `routed`: the hosts of every provider that has a target.
    #[default]
    Routed,
    /// `all`: every catalog host as well, so a job calling a provider this
    /// config does not route is refused and recorded (the provider named)
    /// instead of going direct.
    All,
}

/// `capture.containers` (`true`/`false`, or a mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Containers {
    /// `enabled` (default false): capture them instead of refusing them.
    pub enabled: bool,
    /// `address` (default `169.254.107.116`, "kt" in ASCII): the IPv4
    /// address kt adds to the host's `lo` and listens on for them.
    pub address: std::net::Ipv4Addr,
    /// `address6` (default `fd6b:7400:6b74::1`; null: no IPv6 listener,
    /// matched IPv6 from containers is refused).
    pub address6: Option<std::net::Ipv6Addr>,
}

impl Containers {
    /// The default IPv4 address: link-local (never routed off a link),
    /// unlikely to be used by anything else (cloud metadata services live at
    /// .169.254 and .170.2, Calico's gateway at 169.254.1.1).
    pub const ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 107, 116);
    /// The default IPv6 address: unique local (fd00::/8), `6b74` is "kt".
    pub const ADDRESS6: std::net::Ipv6Addr =
        std::net::Ipv6Addr::new(0xfd6b, 0x7400, 0x6b74, 0, 0, 0, 0, 1);
}

impl Default for Containers {
    fn default() -> Self {
        Containers {
            enabled: false,
            address: Containers::ADDRESS,
            address6: Some(Containers::ADDRESS6),
        }
    }
}

/// `capture.scope`: which TCP connections to the capture ports kt sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CaptureScope {
    /// `provider`: only those to the provider prefixes (resolved hosts and
    /// `cidrs`); everything else never reaches kt.
    #[default]
    Provider,
    /// `port`: every outbound connection to a capture port. Provider names
    /// are terminated; other names on addresses outside the provider
    /// prefixes are spliced by kt and recorded, so a provider edge kt never
    /// resolved (DoH, `--resolve`, a hard-coded IP) is covered too.
    Port,
}

impl CaptureScope {
    /// The name written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureScope::Provider => "provider",
            CaptureScope::Port => "port",
        }
    }
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            enabled: true,
            cgroup: None,
            hosts: None,
            cidrs: Vec::new(),
            ports: vec![443],
            scope: CaptureScope::Provider,
            containers: Containers::default(),
            providers: CaptureProviders::Routed,
            proxies: Vec::new(),
            egress: super::egress::Egress::default(),
        }
    }
}
