//! Keeps capture running for as long as the gateway serves: resolves the
//! provider hosts and attaches (the caller binds its listeners first, so
//! from the first redirected connection there is somewhere to land), keeps
//! the captured prefixes current while DNS moves, changes what is captured
//! in place on reload (never detaching), and detaches only when told to,
//! after the gateway drained: fail closed to the end.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guard_ebpf_common::MAX_PORTS;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::hosts::{self, HostAddrs, SeenPrefixes};
use super::prefix::split;
use super::{Capture, CaptureError, ClientOrigin, SocketExemption};
use crate::config::IpPrefix;

/// What the supervisor drives: the attached programs. [`Capture`] in
/// production; tests use a fake that records calls. Dropping the last
/// handle detaches.
pub trait Programs: Send + Sync + 'static {
    /// Replaces the captured prefixes in place; entries in both the old
    /// and the new set stay matched throughout.
    fn set_prefixes(&self, prefixes: &[IpPrefix]) -> Result<(), CaptureError>;
    /// Replaces the captured ports in place; ports in both the old and the
    /// new set stay matched throughout.
    fn set_ports(&self, ports: &[u16]) -> Result<(), CaptureError>;
    /// Takes the kernel's record of an accepted connection from `peer`.
    fn take_origin(&self, peer: SocketAddr) -> Option<ClientOrigin>;
    /// Exempts the guard's own upstream sockets from these programs.
    fn exemption(&self) -> Arc<dyn SocketExemption>;
    /// Replaces the declared proxies and the strict-egress setup in place
    /// (programs without those hooks ignore it).
    fn set_egress(&self, _spec: &super::EgressSpec) -> Result<(), CaptureError> {
        Ok(())
    }
    /// The reader of egress records, once (`None`: no such hooks).
    fn egress_records(&self) -> Option<super::EgressRecords> {
        None
    }
}

impl Programs for Capture {
    fn set_prefixes(&self, prefixes: &[IpPrefix]) -> Result<(), CaptureError> {
        Capture::set_prefixes(self, prefixes)
    }

    fn set_ports(&self, ports: &[u16]) -> Result<(), CaptureError> {
        Capture::set_ports(self, ports)
    }

    fn take_origin(&self, peer: SocketAddr) -> Option<ClientOrigin> {
        Capture::take_origin(self, peer)
    }

    fn exemption(&self) -> Arc<dyn SocketExemption> {
        Arc::new(Capture::exemption(self))
    }

    fn set_egress(&self, spec: &super::EgressSpec) -> Result<(), CaptureError> {
        Capture::set_egress(self, spec)
    }

    fn egress_records(&self) -> Option<super::EgressRecords> {
        Capture::egress_records(self)
    }
}

/// What to capture: host names (resolved now and every
/// [`hosts::RESOLVE_EVERY`]), fixed prefixes, ports.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    /// Provider host names.
    pub hosts: Vec<String>,
    /// `capture.cidrs`.
    pub static_prefixes: Vec<IpPrefix>,
    /// Destination ports.
    pub ports: Vec<u16>,
}

/// What [`Supervisor::retarget`] changed, for the reload's event and log.
/// Every list is sorted; all empty when nothing changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retargeted {
    /// Host names now captured that were not before.
    pub hosts_added: Vec<String>,
    /// Host names no longer captured.
    pub hosts_removed: Vec<String>,
    /// Listed hosts that did not resolve just now (they are tried again
    /// every [`hosts::RESOLVE_EVERY`]; a kept host keeps its addresses).
    pub hosts_unresolved: Vec<String>,
    /// Prefixes captured from now on (`capture.cidrs` and resolved
    /// addresses).
    pub prefixes_added: Vec<IpPrefix>,
    /// Prefixes no longer captured.
    pub prefixes_removed: Vec<IpPrefix>,
    /// Ports captured from now on.
    pub ports_added: Vec<u16>,
    /// Ports no longer captured.
    pub ports_removed: Vec<u16>,
}

impl Retargeted {
    /// Whether nothing captured changed.
    pub fn is_empty(&self) -> bool {
        self == &Retargeted::default()
    }
}

/// Resolves host names (tests pass a fake).
type ResolveFn = Arc<
    dyn Fn(Vec<String>, Vec<u16>) -> Pin<Box<dyn Future<Output = Vec<HostAddrs>> + Send>>
        + Send
        + Sync,
>;

fn dns() -> ResolveFn {
    Arc::new(|h: Vec<String>, p: Vec<u16>| Box::pin(async move { hosts::resolve(&h, &p).await }))
}

/// What is captured now, shared by [`Supervisor::retarget`] and the
/// refresher.
struct State {
    hosts: Vec<String>,
    static_prefixes: Vec<IpPrefix>,
    seen: SeenPrefixes,
    /// What the maps hold now (sorted, deduplicated).
    prefixes: Vec<IpPrefix>,
    ports: Vec<u16>,
    /// Bumped by every retarget, so a refresh round resolved for the hosts
    /// before it is dropped instead of applied over it.
    generation: u64,
}

/// The static prefixes and the resolved addresses, sorted, without duplicates.
fn captured(static_prefixes: &[IpPrefix], seen: &SeenPrefixes) -> Vec<IpPrefix> {
    let mut v = static_prefixes.to_vec();
    v.extend(seen.prefixes());
    hosts::sort_prefixes(&mut v);
    v.dedup();
    v
}

fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v.dedup();
    v
}

/// What is in `a` and not in `b`.
fn minus<T: PartialEq + Clone>(a: &[T], b: &[T]) -> Vec<T> {
    a.iter().filter(|x| !b.contains(x)).cloned().collect()
}

fn nothing_to_capture() -> CaptureError {
    CaptureError::Spec(
        "nothing to capture: capture.hosts did not resolve and capture.cidrs is empty".into(),
    )
}

/// Attached programs plus the task that keeps their prefixes current.
pub struct Supervisor<P: Programs> {
    programs: Arc<P>,
    state: Arc<Mutex<State>>,
    resolve: ResolveFn,
    learned: LearnedFn,
    refresher: JoinHandle<()>,
}

/// Names learned under wildcard hosts (see [`hosts::LearnedNames`]),
/// resolved with the listed hosts.
type LearnedFn = fn() -> Vec<String>;

fn learned_names() -> Vec<String> {
    hosts::LEARNED.snapshot()
}

impl<P: Programs> std::fmt::Debug for Supervisor<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").finish_non_exhaustive()
    }
}

impl<P: Programs> Supervisor<P> {
    /// Resolves `targets`, attaches with `attach(prefixes)` and starts
    /// refreshing. Call inside the runtime, after the listeners are bound.
    pub async fn start(
        targets: Targets,
        attach: impl FnOnce(Vec<IpPrefix>) -> Result<P, CaptureError>,
    ) -> Result<Supervisor<P>, CaptureError> {
        Supervisor::start_with(targets, attach, dns(), hosts::RESOLVE_EVERY, learned_names).await
    }

    async fn start_with(
        targets: Targets,
        attach: impl FnOnce(Vec<IpPrefix>) -> Result<P, CaptureError>,
        resolve: ResolveFn,
        every: Duration,
        learned: LearnedFn,
    ) -> Result<Supervisor<P>, CaptureError> {
        let Targets {
            hosts,
            static_prefixes,
            ports,
        } = targets;
        let mut seen = SeenPrefixes::new(hosts::RETAIN, hosts::MAX_KEPT);
        seen.update(&resolve(hosts.clone(), ports.clone()).await, Instant::now());
        let prefixes = captured(&static_prefixes, &seen);
        if prefixes.is_empty() {
            return Err(nothing_to_capture());
        }
        let programs = Arc::new(attach(prefixes.clone())?);
        let state = Arc::new(Mutex::new(State {
            hosts,
            static_prefixes,
            seen,
            prefixes,
            ports: sorted(&ports),
            generation: 0,
        }));
        let refresher = tokio::spawn(refresh(
            programs.clone(),
            state.clone(),
            resolve.clone(),
            every,
            learned,
        ));
        Ok(Supervisor {
            programs,
            state,
            resolve,
            learned,
            refresher,
        })
    }

    /// The attached programs (for the gateway's "who is this?" lookups).
    pub fn programs(&self) -> &Arc<P> {
        &self.programs
    }

    /// Replaces what is captured (hosts, `capture.cidrs`, ports) in place,
    /// on the attached programs, without detaching. The new hosts are
    /// resolved before this returns, so when it returns Ok every new prefix
    /// and port is captured; the refresher goes on with the new hosts.
    ///
    /// Order: new ports are added, then the prefixes replaced (new entries
    /// before stale ones go), then stale ports removed, so a connection
    /// matched before and after is captured throughout (never let through,
    /// never refused). A removed host's addresses stop being captured at
    /// once, unless `capture.cidrs` or a host still listed covers them.
    ///
    /// Nothing to capture afterwards (no ports, or no prefix: no cidrs and
    /// no host resolved) is an error that changes nothing, as at start. On
    /// a kernel error the previous sets are put back as far as possible.
    pub async fn retarget(&self, targets: Targets) -> Result<Retargeted, CaptureError> {
        let mut state = self.state.lock().await;
        let Targets {
            hosts,
            static_prefixes,
            ports,
        } = targets;
        let ports = sorted(&ports);
        if ports.is_empty() {
            return Err(CaptureError::Spec(
                "nothing to capture: capture.ports is empty".into(),
            ));
        }
        if ports.len() > MAX_PORTS as usize {
            return Err(CaptureError::Spec(format!(
                "{} ports to capture; at most {MAX_PORTS} fit",
                ports.len()
            )));
        }
        split(&static_prefixes).map_err(|e| CaptureError::Spec(e.to_string()))?;
        let resolved = (self.resolve)(hosts.clone(), ports.clone()).await;
        let mut seen = state.seen.clone();
        // Learned names are not the config's to drop.
        seen.keep_hosts(&hosts::with_learned(&hosts, &(self.learned)()));
        seen.update(&resolved, Instant::now());
        let prefixes = captured(&static_prefixes, &seen);
        if prefixes.is_empty() {
            return Err(nothing_to_capture());
        }

        let change = Retargeted {
            hosts_added: sorted(&minus(&hosts, &state.hosts)),
            hosts_removed: sorted(&minus(&state.hosts, &hosts)),
            hosts_unresolved: sorted(
                &resolved
                    .iter()
                    .filter(|(_, addrs)| addrs.is_empty())
                    .map(|(h, _)| h.clone())
                    .collect::<Vec<_>>(),
            ),
            prefixes_added: minus(&prefixes, &state.prefixes),
            prefixes_removed: minus(&state.prefixes, &prefixes),
            ports_added: minus(&ports, &state.ports),
            ports_removed: minus(&state.ports, &ports),
        };
        if let Err(e) = self.apply(&state, &prefixes, &ports, &change) {
            tracing::error!(error = %e, "changing what is captured failed; restoring the previous sets");
            if let Err(e) = self
                .programs
                .set_ports(&sorted(&[state.ports.clone(), ports.clone()].concat()))
            {
                tracing::error!(error = %e, "could not restore the captured ports");
            }
            if let Err(e) = self.programs.set_prefixes(&state.prefixes) {
                tracing::error!(error = %e, "could not restore the captured prefixes");
            }
            if let Err(e) = self.programs.set_ports(&state.ports) {
                tracing::error!(error = %e, "could not restore the captured ports");
            }
            return Err(e);
        }
        *state = State {
            hosts,
            static_prefixes,
            seen,
            prefixes,
            ports,
            generation: state.generation.wrapping_add(1),
        };
        Ok(change)
    }

    /// Writes the new sets into the maps in the order [`Self::retarget`]
    /// describes.
    fn apply(
        &self,
        old: &State,
        prefixes: &[IpPrefix],
        ports: &[u16],
        change: &Retargeted,
    ) -> Result<(), CaptureError> {
        let mut in_map = old.ports.clone();
        let union = sorted(&[old.ports.clone(), ports.to_vec()].concat());
        // Past the map's size the union cannot be written; set_ports then
        // lets stale ports go first (kept ports stay either way).
        if !change.ports_added.is_empty() && union.len() <= MAX_PORTS as usize {
            self.programs.set_ports(&union)?;
            in_map = union;
        }
        if prefixes != old.prefixes {
            self.programs.set_prefixes(prefixes)?;
        }
        if in_map != ports {
            self.programs.set_ports(ports)?;
        }
        Ok(())
    }

    /// Stops refreshing and detaches. Call after every listener closed and
    /// every other handle on the programs was dropped; `false` when one is
    /// still held (the programs then detach when the process ends).
    pub async fn detach(self) -> bool {
        self.refresher.abort();
        // Wait until the aborted task has dropped its handle on the programs.
        let _ = self.refresher.await;
        match Arc::try_unwrap(self.programs) {
            Ok(p) => {
                drop(p);
                true
            }
            Err(_) => {
                tracing::warn!(
                    "capture still referenced at exit; programs detach when the process ends"
                );
                false
            }
        }
    }
}

/// Provider addresses move: resolves the current hosts every `every` and
/// keeps the tries current.
async fn refresh<P: Programs>(
    programs: Arc<P>,
    state: Arc<Mutex<State>>,
    resolve: ResolveFn,
    every: Duration,
    learned: LearnedFn,
) {
    loop {
        tokio::time::sleep(every).await;
        let (hosts, ports, generation) = {
            let s = state.lock().await;
            (
                hosts::with_learned(&s.hosts, &learned()),
                s.ports.clone(),
                s.generation,
            )
        };
        if hosts.is_empty() {
            continue;
        }
        // Resolved without the lock, so a reload never waits for DNS here.
        let resolved = resolve(hosts, ports).await;
        let mut s = state.lock().await;
        if s.generation != generation {
            // Retargeted meanwhile; its own resolution is newer than this.
            continue;
        }
        if resolved.iter().all(|(_, addrs)| addrs.is_empty()) {
            tracing::warn!("provider hosts did not resolve; keeping the previous addresses");
            continue;
        }
        let added = s.seen.update(&resolved, Instant::now());
        for p in &added {
            tracing::info!(addr = %p.addr, "provider address added to capture");
        }
        let next = captured(&s.static_prefixes, &s.seen);
        if next == s.prefixes {
            continue;
        }
        match programs.set_prefixes(&next) {
            Ok(()) => s.prefixes = next,
            Err(e) => tracing::error!(error = %e, "could not update captured prefixes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex as StdMutex;

    type Log = Arc<StdMutex<Vec<String>>>;

    /// Records every call on the programs, with the sets written.
    struct Fake(Log);

    fn show(p: &[IpPrefix]) -> String {
        p.iter()
            .map(|p| format!("{}/{}", p.addr, p.len))
            .collect::<Vec<_>>()
            .join(",")
    }

    impl Programs for Fake {
        fn set_prefixes(&self, p: &[IpPrefix]) -> Result<(), CaptureError> {
            self.0.lock().unwrap().push(format!("prefixes {}", show(p)));
            Ok(())
        }
        fn set_ports(&self, p: &[u16]) -> Result<(), CaptureError> {
            let p: Vec<String> = p.iter().map(u16::to_string).collect();
            self.0
                .lock()
                .unwrap()
                .push(format!("ports {}", p.join(",")));
            Ok(())
        }
        fn take_origin(&self, _: SocketAddr) -> Option<ClientOrigin> {
            None
        }
        fn exemption(&self) -> Arc<dyn SocketExemption> {
            Arc::new(crate::capture::NoExemption)
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.0.lock().unwrap().push("detach".into());
        }
    }

    fn prefix(s: &str) -> IpPrefix {
        let (addr, len) = s.split_once('/').unwrap();
        IpPrefix {
            addr: addr.parse().unwrap(),
            len: len.parse().unwrap(),
        }
    }

    fn loopback() -> IpPrefix {
        prefix("127.0.0.1/32")
    }

    fn targets(hosts: &[&str], cidrs: &[&str], ports: &[u16]) -> Targets {
        Targets {
            hosts: hosts.iter().map(ToString::to_string).collect(),
            static_prefixes: cidrs.iter().map(|c| prefix(c)).collect(),
            ports: ports.to_vec(),
        }
    }

    /// A resolver answering from a table the test changes, telling the test
    /// which hosts each round asked for.
    struct FakeDns {
        table: Arc<StdMutex<HashMap<String, Vec<IpPrefix>>>>,
        asked: tokio::sync::mpsc::UnboundedReceiver<Vec<String>>,
        resolve: ResolveFn,
    }

    impl FakeDns {
        fn new(entries: &[(&str, &str)]) -> FakeDns {
            let table: HashMap<String, Vec<IpPrefix>> = entries
                .iter()
                .map(|(h, p)| (h.to_string(), vec![prefix(p)]))
                .collect();
            let table = Arc::new(StdMutex::new(table));
            let (tx, asked) = tokio::sync::mpsc::unbounded_channel();
            let t = table.clone();
            let resolve: ResolveFn = Arc::new(move |hosts: Vec<String>, _ports: Vec<u16>| {
                let _ = tx.send(hosts.clone());
                let table = t.lock().unwrap();
                let out: Vec<HostAddrs> = hosts
                    .into_iter()
                    .map(|h| {
                        let addrs = table.get(&h).cloned().unwrap_or_default();
                        (h, addrs)
                    })
                    .collect();
                Box::pin(async move { out })
            });
            FakeDns {
                table,
                asked,
                resolve,
            }
        }

        fn set(&self, host: &str, p: &str) {
            self.table
                .lock()
                .unwrap()
                .insert(host.to_string(), vec![prefix(p)]);
        }
    }

    async fn start(t: Targets, dns: &FakeDns, every: Duration) -> (Supervisor<Fake>, Log) {
        let log: Log = Arc::new(StdMutex::new(Vec::new()));
        let l = log.clone();
        let sup = Supervisor::start_with(
            t,
            |p| {
                l.lock().unwrap().push(format!("attach {}", show(&p)));
                Ok(Fake(l.clone()))
            },
            dns.resolve.clone(),
            every,
            Vec::new,
        )
        .await
        .unwrap();
        (sup, log)
    }

    fn calls(log: &Log) -> Vec<String> {
        log.lock().unwrap().clone()
    }

    /// Long enough that the refresher never runs during a test that does
    /// not wait for it.
    const NEVER: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn attaches_with_the_prefixes_and_detaches_only_when_told() {
        let log = Arc::new(StdMutex::new(Vec::new()));
        let targets = Targets {
            hosts: Vec::new(),
            static_prefixes: vec![loopback()],
            ports: vec![443],
        };
        let l = log.clone();
        let sup = Supervisor::start(targets, |p| {
            l.lock().unwrap().push(format!("attach {}", p.len()));
            Ok(Fake(l.clone()))
        })
        .await
        .unwrap();
        assert_eq!(*log.lock().unwrap(), ["attach 1"]);
        let held = sup.programs().clone();
        drop(held);
        assert!(sup.detach().await);
        assert_eq!(*log.lock().unwrap(), ["attach 1", "detach"]);
    }

    #[tokio::test]
    async fn nothing_to_capture_is_an_error_and_nothing_attaches() {
        let err = Supervisor::<Fake>::start(Targets::default(), |_| unreachable!("attached"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nothing to capture"), "{err}");
    }

    #[tokio::test]
    async fn retarget_adds_new_ports_and_prefixes_before_removing_stale_ones() {
        let dns = FakeDns::new(&[]);
        let t = targets(&[], &["127.77.1.1/32", "127.77.1.2/32"], &[443, 8443]);
        let (sup, log) = start(t, &dns, NEVER).await;
        let change = sup
            .retarget(targets(
                &[],
                &["127.77.1.2/32", "127.77.1.3/32"],
                &[8443, 9443],
            ))
            .await
            .unwrap();
        assert_eq!(
            calls(&log),
            [
                "attach 127.77.1.1/32,127.77.1.2/32",
                // The new port joins while the old one is still there...
                "ports 443,8443,9443",
                // (the fake stands for Capture::set_prefixes, which inserts
                // before it removes)
                "prefixes 127.77.1.2/32,127.77.1.3/32",
                // ...and the stale one goes last.
                "ports 8443,9443",
            ]
        );
        assert_eq!(
            change,
            Retargeted {
                prefixes_added: vec![prefix("127.77.1.3/32")],
                prefixes_removed: vec![prefix("127.77.1.1/32")],
                ports_added: vec![9443],
                ports_removed: vec![443],
                ..Retargeted::default()
            }
        );
        // The same targets again: nothing written, nothing reported.
        let again = sup
            .retarget(targets(
                &[],
                &["127.77.1.3/32", "127.77.1.2/32"],
                &[9443, 8443],
            ))
            .await
            .unwrap();
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(calls(&log).len(), 4);
    }

    #[tokio::test]
    async fn retarget_to_nothing_is_refused_and_changes_nothing() {
        let dns = FakeDns::new(&[("gone.example", "192.0.2.9/32")]);
        let t = targets(&["gone.example"], &["127.77.1.1/32"], &[443]);
        let (sup, log) = start(t, &dns, NEVER).await;
        let before = calls(&log);
        // No cidrs, and the only host does not resolve.
        let err = sup
            .retarget(targets(&["nowhere.example"], &[], &[443]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nothing to capture"), "{err}");
        let err = sup
            .retarget(targets(&["gone.example"], &["127.77.1.1/32"], &[]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("capture.ports is empty"), "{err}");
        let err = sup
            .retarget(targets(&[], &["127.77.1.1/33"], &[443]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        assert_eq!(calls(&log), before, "a refused retarget wrote to the maps");
        // What is captured is still the original set: retargeting to it
        // again reports no change.
        let same = sup
            .retarget(targets(&["gone.example"], &["127.77.1.1/32"], &[443]))
            .await
            .unwrap();
        assert!(same.is_empty(), "{same:?}");
    }

    #[tokio::test]
    async fn retarget_resolves_new_hosts_now_and_releases_removed_hosts_addresses() {
        let dns = FakeDns::new(&[
            ("old.example", "192.0.2.1/32"),
            ("kept.example", "192.0.2.2/32"),
            ("new.example", "192.0.2.3/32"),
        ]);
        let t = targets(&["old.example", "kept.example"], &["192.0.2.1/32"], &[443]);
        let (sup, log) = start(t, &dns, NEVER).await;
        let change = sup
            .retarget(targets(
                &["kept.example", "new.example", "dead.example"],
                &[],
                &[443],
            ))
            .await
            .unwrap();
        assert_eq!(
            change,
            Retargeted {
                hosts_added: vec!["dead.example".into(), "new.example".into()],
                hosts_removed: vec!["old.example".into()],
                hosts_unresolved: vec!["dead.example".into()],
                prefixes_added: vec![prefix("192.0.2.3/32")],
                // old.example's address was also a cidr; now neither holds it.
                prefixes_removed: vec![prefix("192.0.2.1/32")],
                ..Retargeted::default()
            }
        );
        assert_eq!(
            calls(&log).last().map(String::as_str),
            Some("prefixes 192.0.2.2/32,192.0.2.3/32")
        );
    }

    #[tokio::test]
    async fn the_refresher_goes_on_with_the_new_hosts() {
        let mut dns = FakeDns::new(&[("old.example", "192.0.2.1/32")]);
        let t = targets(&["old.example"], &[], &[443]);
        let (sup, log) = start(t, &dns, Duration::from_millis(5)).await;
        assert_eq!(dns.asked.recv().await.unwrap(), ["old.example"]);
        dns.set("new.example", "192.0.2.3/32");
        // Refresh rounds already under way may still ask for the old host;
        // the retarget is what every later round must follow.
        sup.retarget(targets(&["new.example"], &[], &[443]))
            .await
            .unwrap();
        // The provider's address moves; the refresher must pick it up for
        // the new host and never bring the old host's address back.
        dns.set("new.example", "192.0.2.4/32");
        dns.set("old.example", "192.0.2.9/32");
        let want = "prefixes 192.0.2.3/32,192.0.2.4/32";
        // Each refresh round asks the resolver; wait round by round (the
        // timeout only turns a refresher stuck on the old hosts into a
        // failure instead of a hang).
        let rounds = async {
            while !calls(&log).iter().any(|c| c == want) {
                dns.asked.recv().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(20), rounds)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the refresher never captured the new host's new address: {:?}",
                    calls(&log)
                )
            });
        let log = calls(&log);
        let after: Vec<&String> = log
            .iter()
            .skip_while(|c| !c.contains("192.0.2.3"))
            .collect();
        assert!(
            after
                .iter()
                .all(|c| !c.contains("192.0.2.1") && !c.contains("192.0.2.9")),
            "{log:?}"
        );
    }

    static TEST_LEARNED: hosts::LearnedNames = hosts::LearnedNames::new();
    fn test_learned() -> Vec<String> {
        TEST_LEARNED.snapshot()
    }

    /// A name the gateway saw under a wildcard is resolved from then on
    /// and its address captured; a retarget does not drop it.
    #[tokio::test]
    async fn learned_wildcard_names_are_resolved_and_captured() {
        let mut dns = FakeDns::new(&[
            ("res1.openai.azure.com", "192.0.2.1/32"),
            ("res2.openai.azure.com", "192.0.2.2/32"),
        ]);
        let log: Log = Arc::new(StdMutex::new(Vec::new()));
        let l = log.clone();
        let sup = Supervisor::start_with(
            targets(&["res1.openai.azure.com"], &[], &[443]),
            |p| {
                l.lock().unwrap().push(format!("attach {}", show(&p)));
                Ok(Fake(l.clone()))
            },
            dns.resolve.clone(),
            Duration::from_millis(5),
            test_learned,
        )
        .await
        .unwrap();
        assert_eq!(dns.asked.recv().await.unwrap(), ["res1.openai.azure.com"]);
        assert!(TEST_LEARNED.learn("res2.openai.azure.com"));
        let want = "prefixes 192.0.2.1/32,192.0.2.2/32";
        let rounds = async {
            while !calls(&log).iter().any(|c| c == want) {
                dns.asked.recv().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(20), rounds)
            .await
            .unwrap_or_else(|_| panic!("the learned name was never captured: {:?}", calls(&log)));
        sup.retarget(targets(&["res1.openai.azure.com"], &[], &[443]))
            .await
            .unwrap();
        let state = sup.state.lock().await;
        assert!(
            state.prefixes.contains(&prefix("192.0.2.2/32")),
            "{:?}",
            state.prefixes
        );
    }
}
