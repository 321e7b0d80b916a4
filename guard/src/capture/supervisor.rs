//! Keeps capture running for as long as the gateway serves: resolves the
//! provider hosts and attaches (the caller binds its listeners first, so
//! from the first redirected connection there is somewhere to land), keeps
//! the captured prefixes current while DNS moves, and detaches only when
//! told to, after the gateway drained: fail closed to the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;

use super::hosts::{self, SeenPrefixes};
use super::{Capture, CaptureError, ClientOrigin, SocketExemption};
use crate::config::IpPrefix;

/// What the supervisor drives: the attached programs. [`Capture`] in
/// production; tests use a fake that records calls. Dropping the last
/// handle detaches.
pub trait Programs: Send + Sync + 'static {
    /// Replaces the captured prefixes.
    fn set_prefixes(&self, prefixes: &[IpPrefix]) -> Result<(), CaptureError>;
    /// Takes the kernel's record of an accepted connection from `peer`.
    fn take_origin(&self, peer: SocketAddr) -> Option<ClientOrigin>;
    /// Exempts the guard's own upstream sockets from these programs.
    fn exemption(&self) -> Arc<dyn SocketExemption>;
}

impl Programs for Capture {
    fn set_prefixes(&self, prefixes: &[IpPrefix]) -> Result<(), CaptureError> {
        Capture::set_prefixes(self, prefixes)
    }

    fn take_origin(&self, peer: SocketAddr) -> Option<ClientOrigin> {
        Capture::take_origin(self, peer)
    }

    fn exemption(&self) -> Arc<dyn SocketExemption> {
        Arc::new(Capture::exemption(self))
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

/// Attached programs plus the task that keeps their prefixes current.
pub struct Supervisor<P: Programs> {
    programs: Arc<P>,
    refresher: JoinHandle<()>,
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
        let Targets {
            hosts,
            static_prefixes,
            ports,
        } = targets;
        let mut seen = SeenPrefixes::new(hosts::RETAIN, hosts::MAX_KEPT);
        seen.update(&hosts::resolve(&hosts, &ports).await, Instant::now());
        let mut prefixes = static_prefixes.clone();
        prefixes.extend(seen.prefixes());
        if prefixes.is_empty() {
            return Err(CaptureError::Spec(
                "nothing to capture: capture.hosts did not resolve and capture.cidrs is empty"
                    .into(),
            ));
        }
        let programs = Arc::new(attach(prefixes)?);

        // Provider addresses move; keep the tries current.
        let refresher = {
            let capture = programs.clone();
            tokio::spawn(async move {
                if hosts.is_empty() {
                    return;
                }
                loop {
                    tokio::time::sleep(hosts::RESOLVE_EVERY).await;
                    let resolved = hosts::resolve(&hosts, &ports).await;
                    if resolved.is_empty() {
                        tracing::warn!(
                            "provider hosts did not resolve; keeping the previous addresses"
                        );
                        continue;
                    }
                    let added = seen.update(&resolved, Instant::now());
                    for p in &added {
                        tracing::info!(addr = %p.addr, "provider address added to capture");
                    }
                    let mut p = static_prefixes.clone();
                    p.extend(seen.prefixes());
                    if let Err(e) = capture.set_prefixes(&p) {
                        tracing::error!(error = %e, "could not update captured prefixes");
                    }
                }
            })
        };
        Ok(Supervisor {
            programs,
            refresher,
        })
    }

    /// The attached programs (for the gateway's "who is this?" lookups).
    pub fn programs(&self) -> &Arc<P> {
        &self.programs
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fake(Arc<Mutex<Vec<String>>>);

    impl Programs for Fake {
        fn set_prefixes(&self, p: &[IpPrefix]) -> Result<(), CaptureError> {
            self.0.lock().unwrap().push(format!("set {}", p.len()));
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

    fn loopback() -> IpPrefix {
        IpPrefix {
            addr: "127.0.0.1".parse().unwrap(),
            len: 32,
        }
    }

    #[tokio::test]
    async fn attaches_with_the_prefixes_and_detaches_only_when_told() {
        let log = Arc::new(Mutex::new(Vec::new()));
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
}
