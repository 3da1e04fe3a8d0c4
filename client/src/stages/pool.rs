//! The read buffers: a fixed number of equally sized buffers that the readers fill and the
//! chunks cut from them share. The pool is the backup's memory bound, whatever the tree or file
//! size: a buffer goes back when the last chunk cut from it is dropped (uploaded, or found present
//! on the appliance). See [`super::read`] for why taking a buffer before a job cannot deadlock.
//!
//! Must never: clear a buffer between uses (it is zero-filled once, when made), or hand out more
//! than its `count` buffers.

use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;

/// A fixed number of equally sized read buffers.
#[derive(Debug)]
pub struct BufPool {
    state: Mutex<PoolState>,
    freed: Condvar,
    count: usize,
    capacity: usize,
}

/// A read buffer: zero-filled once when made, then reused as is (no clearing between uses);
/// `used` bytes at the front hold data.
#[derive(Debug)]
pub struct Buf {
    pub(super) data: Vec<u8>,
    pub(super) used: usize,
}

impl Buf {
    /// The filled part.
    #[must_use]
    pub fn filled(&self) -> &[u8] {
        &self.data[..self.used]
    }
}

#[derive(Debug)]
struct PoolState {
    free: Vec<Buf>,
    made: usize,
    waiting: usize,
}

impl BufPool {
    /// `count` buffers of `capacity` bytes, allocated on first use.
    #[must_use]
    pub fn new(count: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PoolState {
                free: Vec::new(),
                made: 0,
                waiting: 0,
            }),
            freed: Condvar::new(),
            count: count.max(1),
            capacity,
        })
    }

    /// Bytes of one buffer.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn take_locked(&self, s: &mut PoolState) -> Option<Buf> {
        if let Some(b) = s.free.pop() {
            return Some(b);
        }
        if s.made < self.count {
            s.made += 1;
            return Some(Buf {
                data: vec![0; self.capacity],
                used: 0,
            });
        }
        None
    }

    /// A free buffer, if there is one.
    #[cfg(test)]
    pub fn try_take(&self) -> Option<Buf> {
        self.take_locked(&mut self.state.lock().expect("pool lock"))
    }

    /// A free buffer; when there is none, counts this thread as waiting, calls `on_wait` and
    /// waits for one.
    pub fn take(&self, on_wait: impl FnOnce()) -> Buf {
        let mut s = self.state.lock().expect("pool lock");
        if let Some(b) = self.take_locked(&mut s) {
            return b;
        }
        s.waiting += 1;
        drop(s);
        on_wait();
        let mut s = self.state.lock().expect("pool lock");
        loop {
            if let Some(b) = self.take_locked(&mut s) {
                s.waiting -= 1;
                return b;
            }
            s = self.freed.wait(s).expect("pool lock");
        }
    }

    /// Threads waiting for a buffer now.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.state.lock().expect("pool lock").waiting
    }

    pub(super) fn give(&self, mut b: Buf) {
        b.used = 0;
        self.state.lock().expect("pool lock").free.push(b);
        self.freed.notify_one();
    }
}

/// A pooled buffer shared by the chunks cut from it; returns to the pool when the last one drops.
struct Pooled {
    buf: Option<Buf>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], Buf::filled)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

/// Freezes a filled buffer into shared bytes that go back to `pool` when dropped.
#[must_use]
pub fn freeze(buf: Buf, pool: &Arc<BufPool>) -> Bytes {
    Bytes::from_owner(Pooled {
        buf: Some(buf),
        pool: pool.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_the_pool_when_the_last_chunk_drops() {
        let pool = BufPool::new(2, 64);
        let mut a = pool.try_take().unwrap();
        a.data[..5].copy_from_slice(b"chunk");
        a.used = 5;
        let b = pool.try_take().unwrap();
        assert!(pool.try_take().is_none(), "two buffers only");
        let shared = freeze(a, &pool);
        let chunk = shared.slice(1..3);
        drop(shared);
        assert!(pool.try_take().is_none(), "a chunk still holds the buffer");
        drop(chunk);
        assert!(pool.try_take().is_some());
        pool.give(b);
        assert!(pool.try_take().is_some());
    }
}
