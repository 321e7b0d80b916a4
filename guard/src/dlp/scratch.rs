//! Per-thread reuse of the large working buffers of a scan (the joined view
//! and its piece map, the lower-cased copy for blocked terms). A fresh
//! megabyte-sized allocation per request costs page faults that would
//! otherwise dominate the no-match path. Buffers above `MAX_KEEP` bytes are
//! freed rather than kept, so an occasional huge body does not pin memory.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Largest buffer kept for reuse, in bytes.
const MAX_KEEP: usize = 8 * 1024 * 1024;
/// Buffers kept per type and thread.
const KEEP: usize = 4;

/// A pool of vectors of one element type.
pub(crate) type Pool<T> = LocalKey<RefCell<Vec<Vec<T>>>>;

thread_local! {
    pub(crate) static BYTES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    pub(crate) static OFFSETS: RefCell<Vec<Vec<usize>>> = const { RefCell::new(Vec::new()) };
}

/// An empty vector, reusing a kept allocation when there is one.
pub(crate) fn take<T: 'static>(pool: &'static Pool<T>) -> Vec<T> {
    pool.try_with(|p| p.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Hands a vector back for reuse.
pub(crate) fn give<T: 'static>(pool: &'static Pool<T>, mut v: Vec<T>) {
    if v.capacity() == 0 || v.capacity() * size_of::<T>() > MAX_KEEP {
        return;
    }
    v.clear();
    let _ = pool.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEEP {
            p.push(v);
        }
    });
}
