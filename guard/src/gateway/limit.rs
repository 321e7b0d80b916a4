//! The connection budget shared by every listener. A slot is held for a
//! connection's whole life, so memory is bounded by the budget. A connection
//! that has not sent a request yet (no hello, a handshake in progress, no
//! request headers) is *idle* and may be closed to make room: thousands of
//! idle sockets cannot lock a real client out, they only push each other out.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Connections served at once, with eviction of idle ones.
pub(crate) struct ConnLimit {
    permits: Arc<Semaphore>,
    idle: Mutex<Idle>,
    next_id: AtomicU64,
    refused: AtomicU64,
    evicted: AtomicU64,
}

#[derive(Default)]
struct Idle {
    /// Ids oldest first; ids no longer in `wake` are skipped (lazy removal).
    order: VecDeque<u64>,
    wake: HashMap<u64, Arc<Shared>>,
}

/// What an idle connection shares with the budget: its permit, which a new
/// connection takes over directly (no waiting for the old task to run), and
/// the signal that tells the old task to close.
struct Shared {
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    evict: Notify,
}

/// One admitted connection. Dropping it frees the slot.
pub(crate) struct Slot {
    shared: Arc<Shared>,
    id: u64,
    limit: Arc<ConnLimit>,
    /// Requests (and tunnels) in progress; at zero the connection is idle
    /// again and may be closed to make room.
    in_flight: std::sync::atomic::AtomicUsize,
}

/// One request in progress on a connection; dropped when its response
/// body is done (or the tunnel it opened closed).
pub(crate) struct InFlight {
    slot: Arc<Slot>,
}

impl ConnLimit {
    /// A budget of `max` connections.
    pub(crate) fn new(max: usize) -> Arc<ConnLimit> {
        Arc::new(ConnLimit {
            permits: Arc::new(Semaphore::new(max.max(1))),
            idle: Mutex::new(Idle::default()),
            next_id: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        })
    }

    /// A slot for a new connection: free, or taken from the oldest idle
    /// connection. `None` when every slot is busy serving requests.
    pub(crate) async fn admit(self: &Arc<Self>) -> Option<Slot> {
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let Some(p) = self.evict_oldest_idle() else {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                p
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            permit: Mutex::new(Some(permit)),
            evict: Notify::new(),
        });
        if let Ok(mut idle) = self.idle.lock() {
            idle.order.push_back(id);
            idle.wake.insert(id, Arc::clone(&shared));
        }
        Some(Slot {
            shared,
            id,
            limit: Arc::clone(self),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Takes the slot of the oldest idle connection and tells it to close.
    fn evict_oldest_idle(&self) -> Option<OwnedSemaphorePermit> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(id) = idle.order.pop_front() {
            if let Some(victim) = idle.wake.remove(&id) {
                let permit = victim.permit.lock().ok().and_then(|mut p| p.take());
                // notify_one stores a permit, so a task not yet waiting still sees it.
                victim.evict.notify_one();
                if let Some(p) = permit {
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                    return Some(p);
                }
            }
        }
        None
    }

    fn forget(&self, id: u64) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.wake.remove(&id);
            // Keep the queue from growing with ids of busy connections.
            if idle.order.len() > 2 * idle.wake.len() + 64 {
                let Idle { order, wake } = &mut *idle;
                order.retain(|i| wake.contains_key(i));
            }
        }
    }

    /// Connections refused because every slot was busy.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Idle connections closed to make room.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

impl Slot {
    /// The connection sent a request: it is no longer closed to make room.
    pub(crate) fn busy(&self) {
        self.limit.forget(self.id);
    }

    /// A request starts: busy until the returned guard is dropped, then
    /// idle (closable to make room) again when nothing else is in flight.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.busy();
        InFlight {
            slot: Arc::clone(self),
        }
    }

    fn idle_again(&self) {
        if let Ok(mut idle) = self.limit.idle.lock() {
            // Checked under the lock, so a request starting now is seen.
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                idle.order.push_back(self.id);
                idle.wake.insert(self.id, Arc::clone(&self.shared));
            }
        }
    }

    /// Resolves when this connection was chosen to make room.
    pub(crate) async fn evicted(&self) {
        self.shared.evict.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limit.forget(self.id);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.slot.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.slot.idle_again();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admits one more connection while the budget is full; the evicted
    /// one (which must be `expect`) lets go of its slot when told.
    async fn admit_over(limit: &Arc<ConnLimit>, expect: Slot) -> Slot {
        let admitting = tokio::spawn({
            let limit = Arc::clone(limit);
            async move { limit.admit().await }
        });
        expect.evicted().await;
        drop(expect);
        admitting.await.unwrap().expect("admitted after eviction")
    }

    #[tokio::test]
    async fn idle_connections_make_room_and_busy_ones_do_not() {
        let limit = ConnLimit::new(2);
        let a = limit.admit().await.unwrap();
        let b = limit.admit().await.unwrap();
        b.busy();
        // Full: the idle one (a) is told to go, never the busy one (b).
        let c = admit_over(&limit, a).await;
        assert_eq!(limit.evicted(), 1);
        let _d = admit_over(&limit, c).await;
        assert_eq!(limit.evicted(), 2);
        assert_eq!(limit.refused(), 0);
        drop(b);
    }

    #[tokio::test]
    async fn a_connection_is_idle_again_once_its_requests_are_done() {
        let limit = ConnLimit::new(1);
        let a = Arc::new(limit.admit().await.unwrap());
        let req = a.begin();
        assert!(
            limit.admit().await.is_none(),
            "a busy connection was evicted"
        );
        drop(req);
        let admitting = tokio::spawn({
            let limit = Arc::clone(&limit);
            async move { limit.admit().await.is_some() }
        });
        a.evicted().await;
        drop(a);
        assert!(admitting.await.unwrap());
    }

    #[tokio::test]
    async fn a_full_budget_of_busy_connections_refuses() {
        let limit = ConnLimit::new(1);
        let a = limit.admit().await.unwrap();
        a.busy();
        assert!(limit.admit().await.is_none());
        assert_eq!(limit.refused(), 1);
        drop(a);
        assert!(limit.admit().await.is_some());
    }
}

/// Connections per user id, so one job cannot take the whole budget.
#[derive(Debug)]
pub(crate) struct UidBudget {
    max: usize,
    held: Mutex<HashMap<u32, usize>>,
    refused: AtomicU64,
}

/// One connection counted against its uid; dropping it gives it back.
#[derive(Debug)]
pub(crate) struct UidSlot {
    uid: u32,
    budget: Arc<UidBudget>,
}

impl UidBudget {
    /// At most `max` connections per uid.
    pub(crate) fn new(max: usize) -> Arc<UidBudget> {
        Arc::new(UidBudget {
            max: max.max(1),
            held: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        })
    }

    /// Counts a connection of `uid`; `None` when that uid is at its limit.
    pub(crate) fn admit(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut held = self.held.lock().ok()?;
        let n = held.entry(uid).or_insert(0);
        if *n >= self.max {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        Some(UidSlot {
            uid,
            budget: Arc::clone(self),
        })
    }

    /// Connections refused because their uid was at its limit.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        if let Ok(mut held) = self.budget.held.lock()
            && let Some(n) = held.get_mut(&self.uid)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod uid_tests {
    use super::*;

    #[test]
    fn one_uid_at_its_limit_does_not_block_another() {
        let b = UidBudget::new(2);
        let a1 = b.admit(1000).unwrap();
        let _a2 = b.admit(1000).unwrap();
        assert!(b.admit(1000).is_none());
        assert!(b.admit(1001).is_some());
        drop(a1);
        assert!(b.admit(1000).is_some());
        assert_eq!(b.refused(), 1);
    }
}
