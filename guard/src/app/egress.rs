//! Declared proxies and strict egress for `kt run`: what the hooks need
//! (proxy addresses, the resolved allowlist, the resolvers), the proxy
//! listeners, the task turning egress records into events and the one
//! keeping allowlisted host names resolved.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::capture::egress::{Dedup, cgroup_path_of_id, system_resolvers};
use crate::capture::hosts::{self, SeenPrefixes};
use crate::capture::{self, EgressSpec, Programs};
use crate::config::{AllowDest, Config, EgressMode, IpPrefix, ProxyAddr, parse_proxy_url};
use crate::gateway::Gateway;
use crate::record::ClientInfo;

/// Most host names remembered for naming addresses in egress events.
const MAX_NAMES: usize = 8_192;

/// Addresses kt resolved, by the host name it resolved them for.
pub(crate) type Names = Arc<Mutex<HashMap<IpAddr, String>>>;

/// What `kt run` sets up for proxies and strict egress.
pub(crate) struct EgressPlan {
    pub(crate) spec: EgressSpec,
    pub(crate) names: Names,
    allow_hosts: Vec<(String, Option<u16>)>,
    static_allow: Vec<(IpPrefix, Option<u16>)>,
    seen: SeenPrefixes,
    pub(crate) proxy4: Option<TcpListener>,
    pub(crate) proxy6: Option<TcpListener>,
}

/// `capture.proxies`, plus `HTTPS_PROXY`/`https_proxy` of kt's own
/// environment (a job started beside kt inherits the same variables).
pub fn declared_proxies(config: &Config) -> Vec<ProxyAddr> {
    let mut v = config.capture.proxies.clone();
    for var in ["HTTPS_PROXY", "https_proxy"] {
        if let Ok(value) = std::env::var(var)
            && !value.trim().is_empty()
        {
            match parse_proxy_url(&value) {
                Ok(p) if !v.contains(&p) => v.push(p),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(var, error = %e, "proxy variable not usable as a declared proxy");
                }
            }
        }
    }
    v
}

fn remember(names: &Names, resolved: &[hosts::HostAddrs]) {
    if let Ok(mut n) = names.lock() {
        for (host, addrs) in resolved {
            for p in addrs {
                if n.len() >= MAX_NAMES {
                    n.clear();
                }
                n.insert(p.addr, host.clone());
            }
        }
    }
}

impl EgressPlan {
    /// Resolves proxies, allowlisted hosts and resolvers, and binds the
    /// proxy listeners when a proxy is declared.
    pub(crate) async fn prepare(config: &Config) -> std::io::Result<EgressPlan> {
        let egress = &config.capture.egress;
        let names: Names = Arc::new(Mutex::new(HashMap::new()));
        let proxies = declared_proxies(config);
        let mut proxy_addrs = Vec::new();
        for p in &proxies {
            match tokio::net::lookup_host((p.host.as_str(), p.port)).await {
                Ok(addrs) => {
                    for a in addrs {
                        if !proxy_addrs.contains(&a) {
                            proxy_addrs.push(a);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(proxy = %p, error = %e, "declared proxy does not resolve; its connections are not captured");
                }
            }
        }
        let (proxy4, proxy6) = if proxy_addrs.is_empty() {
            (None, None)
        } else {
            let at = config.gateway.proxy_listen;
            let l4 = TcpListener::bind(at).await?;
            let l6 = match TcpListener::bind((Ipv6Addr::LOCALHOST, at.port())).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(port = at.port(), error = %e, "no IPv6 proxy listener: connections to IPv6 proxies will be refused");
                    None
                }
            };
            (Some(l4), l6)
        };
        let mut allow_hosts = Vec::new();
        let mut static_allow = Vec::new();
        for e in &egress.allow {
            match &e.dest {
                AllowDest::Host(h) => allow_hosts.push((h.clone(), e.port)),
                AllowDest::Prefix(p) => static_allow.push((*p, e.port)),
            }
        }
        let resolvers = match &egress.resolvers {
            Some(r) => r.clone(),
            None if egress.mode == EgressMode::Off => Vec::new(),
            None => system_resolvers(),
        };
        if egress.mode == EgressMode::Enforce && resolvers.is_empty() {
            tracing::warn!(
                "strict egress: no DNS resolver found; DNS (53/853) is refused except on loopback"
            );
        }
        let mut plan = EgressPlan {
            spec: EgressSpec {
                mode: egress.mode,
                allow: Vec::new(),
                resolvers,
                proxies: proxy_addrs,
                proxy_listen4: proxy4.as_ref().and_then(|l| match l.local_addr() {
                    Ok(SocketAddr::V4(a)) => Some(a),
                    _ => None::<SocketAddrV4>,
                }),
                proxy_listen6: proxy6.as_ref().and_then(|l| match l.local_addr() {
                    Ok(SocketAddr::V6(a)) => Some(a),
                    _ => None::<SocketAddrV6>,
                }),
            },
            names,
            allow_hosts,
            static_allow,
            seen: SeenPrefixes::new(hosts::RETAIN, hosts::MAX_KEPT),
            proxy4,
            proxy6,
        };
        if egress.mode != EgressMode::Off {
            // Provider names too, so an event names the address it shows.
            let provider_hosts = hosts::capture_hosts(config);
            let resolved = hosts::resolve(&provider_hosts, &[443]).await;
            remember(&plan.names, &resolved);
            plan.resolve_allow().await;
        }
        Ok(plan)
    }

    /// Resolves the allowlisted host names into the spec.
    async fn resolve_allow(&mut self) {
        let hosts: Vec<String> = self.allow_hosts.iter().map(|(h, _)| h.clone()).collect();
        let resolved = hosts::resolve(&hosts, &[443]).await;
        remember(&self.names, &resolved);
        // One SeenPrefixes per allowlist: retention keeps an address a job
        // cached allowed for a day after DNS stopped returning it.
        self.seen.update(&resolved, Instant::now());
        let mut allow = self.static_allow.clone();
        for (host, addrs) in &resolved {
            for (h, port) in &self.allow_hosts {
                if h == host {
                    allow.extend(addrs.iter().map(|p| (*p, *port)));
                }
            }
        }
        // Addresses retained from earlier rounds, for every port the host allows.
        let current: Vec<IpPrefix> = resolved.iter().flat_map(|(_, a)| a.clone()).collect();
        for p in self.seen.prefixes() {
            if !current.contains(&p) {
                for (_, port) in &self.allow_hosts {
                    allow.push((p, *port));
                }
            }
        }
        allow.sort_by_key(|(p, port)| (p.addr, p.len, *port));
        allow.dedup();
        self.spec.allow = allow;
    }

    /// Whether anything is set up (proxies or an egress mode).
    pub(crate) fn active(&self) -> bool {
        self.spec.mode != EgressMode::Off || !self.spec.proxies.is_empty()
    }
}

/// The running egress tasks; abort them before capture detaches (they
/// hold the programs).
pub(crate) struct EgressTasks(Vec<JoinHandle<()>>);

impl EgressTasks {
    pub(crate) async fn stop(self) {
        for t in &self.0 {
            t.abort();
        }
        for t in self.0 {
            let _ = t.await;
        }
    }
}

/// Starts the record reader and the allowlist refresher.
pub(crate) fn start<P: Programs>(
    mut plan: EgressPlan,
    programs: Arc<P>,
    gateway: Gateway,
    cgroup: PathBuf,
) -> EgressTasks {
    let mut tasks = Vec::new();
    if plan.spec.mode != EgressMode::Off
        && let Some(records) = programs.egress_records()
    {
        let names = Arc::clone(&plan.names);
        tasks.push(tokio::spawn(feed(records, gateway, names, cgroup)));
    }
    if plan.spec.mode != EgressMode::Off && !plan.allow_hosts.is_empty() {
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(hosts::RESOLVE_EVERY).await;
                let before = plan.spec.allow.clone();
                plan.resolve_allow().await;
                if plan.spec.allow != before
                    && let Err(e) = programs.set_egress(&plan.spec)
                {
                    tracing::error!(error = %e, "could not update the egress allowlist");
                }
            }
        }));
    }
    EgressTasks(tasks)
}

/// Egress records → events, one per process and destination.
async fn feed(
    mut records: capture::EgressRecords,
    gateway: Gateway,
    names: Names,
    cgroup: PathBuf,
) {
    let mount = capture::cgroup2_mount().ok();
    let mut dedup = Dedup::new(16_384);
    loop {
        let batch = match records.next_batch().await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "egress records can no longer be read");
                return;
            }
        };
        let fresh: Vec<_> = batch.into_iter().filter(|s| dedup.first(s)).collect();
        if fresh.is_empty() {
            continue;
        }
        let (mount, cgroup) = (mount.clone(), cgroup.clone());
        let named = tokio::task::spawn_blocking(move || {
            fresh
                .into_iter()
                .map(|s| {
                    let p = capture::process_info(s.pid);
                    let context = p.context();
                    let path = p.cgroup.or_else(|| {
                        mount
                            .as_deref()
                            .and_then(|m| cgroup_path_of_id(m, &cgroup, s.cgroup_id))
                    });
                    let client = ClientInfo {
                        pid: Some(s.pid),
                        uid: Some(s.uid),
                        cgroup_id: Some(s.cgroup_id),
                        exe: p.exe,
                        cmdline: p.cmdline,
                        container_id: path.as_deref().and_then(capture::container_id),
                        cgroup: path,
                        context,
                    };
                    (s, client)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (seen, client) in named {
            let name = names
                .lock()
                .ok()
                .and_then(|n| n.get(&seen.dst.ip()).cloned());
            gateway.record_egress(&seen, client, name.as_deref());
        }
    }
}
