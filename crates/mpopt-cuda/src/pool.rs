//! Buffer reuse by liveness: a freed buffer goes back to a pool keyed by its size class, and the next
//! allocation of that class takes it instead of asking the device for memory.
//!
//! The executor frees each value right after its last consumer has run (the CPU executor's use counts), so
//! on a chain of same-shaped activations the pool serves every allocation after the first few: steady-state
//! runs allocate nothing. Shapes are only known at run time (dynamic batch, sequence length), so the plan is
//! made as the graph runs rather than ahead of it. Memory held by the pool is released when the executor is
//! dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Bytes rounded up to the allocation class: 512-byte steps below 1 MiB, 1 MiB steps above.
pub fn size_class(bytes: usize) -> usize {
    const MIB: usize = 1 << 20;
    if bytes <= MIB {
        bytes.max(1).div_ceil(512) * 512
    } else {
        bytes.div_ceil(MIB) * MIB
    }
}

/// Free buffers by size class, and counters.
pub struct Pool<T> {
    free: HashMap<usize, Vec<T>>,
    /// Buffers requested from the device.
    pub allocs: usize,
    /// Requests served from the pool.
    pub reused: usize,
    live: usize,
    held: usize,
    /// Most bytes held at once (live plus pooled).
    pub peak: usize,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            free: HashMap::new(),
            allocs: 0,
            reused: 0,
            live: 0,
            held: 0,
            peak: 0,
        }
    }
}

/// A pooled buffer: returns to its pool when dropped.
pub struct Pooled<T> {
    item: Option<T>,
    class: usize,
    pool: Arc<Mutex<Pool<T>>>,
}

impl<T> Pooled<T> {
    /// The buffer.
    pub fn get(&self) -> &T {
        self.item.as_ref().expect("present until dropped")
    }
    /// Its size class in bytes.
    pub fn class(&self) -> usize {
        self.class
    }
}

impl<T> Drop for Pooled<T> {
    fn drop(&mut self) {
        if let Some(t) = self.item.take() {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            p.live -= self.class;
            p.free.entry(self.class).or_default().push(t);
        }
    }
}

/// Takes a free buffer of `bytes`' class from `pool`, or makes one with `make(class_bytes)`.
pub fn take<T, E>(
    pool: &Arc<Mutex<Pool<T>>>,
    bytes: usize,
    make: impl FnOnce(usize) -> Result<T, E>,
) -> Result<Arc<Pooled<T>>, E> {
    let class = size_class(bytes);
    let reused = {
        let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
        let r = p.free.get_mut(&class).and_then(Vec::pop);
        if r.is_some() {
            p.reused += 1;
            p.live += class;
        }
        r
    };
    let item = match reused {
        Some(t) => t,
        None => {
            let t = make(class)?;
            let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
            p.allocs += 1;
            p.live += class;
            p.held += class;
            p.peak = p.peak.max(p.held);
            t
        }
    };
    Ok(Arc::new(Pooled {
        item: Some(item),
        class,
        pool: pool.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class((1 << 20) + 1), 2 << 20);
    }

    #[test]
    fn a_freed_buffer_is_reused_and_a_live_one_is_not() {
        let pool: Arc<Mutex<Pool<u32>>> = Arc::default();
        let mut made = 0;
        let mut mk = |_| -> Result<u32, ()> {
            made += 1;
            Ok(made)
        };
        let a = take(&pool, 1000, &mut mk).unwrap();
        let b = take(&pool, 1000, &mut mk).unwrap();
        assert_ne!(a.get(), b.get(), "two live buffers are distinct");
        let id = *a.get();
        drop(a);
        let c = take(&pool, 900, &mut mk).unwrap();
        assert_eq!(*c.get(), id, "same class: the freed buffer comes back");
        let d = take(&pool, 5000, &mut mk).unwrap();
        assert_ne!(*d.get(), id);
        let p = pool.lock().unwrap();
        assert_eq!((p.allocs, p.reused), (3, 1));
        assert_eq!(p.peak, 1024 + 1024 + 5120);
    }

    #[test]
    fn a_chain_of_same_sized_values_needs_two_buffers() {
        // x0 -> x1 -> ... -> x9, each value freed after its consumer: ping-pong between two buffers
        let pool: Arc<Mutex<Pool<usize>>> = Arc::default();
        let mut n = 0;
        let mut prev = take(&pool, 4096, |_| -> Result<usize, ()> {
            n += 1;
            Ok(n)
        })
        .unwrap();
        for _ in 0..9 {
            let next = take(&pool, 4096, |_| -> Result<usize, ()> {
                n += 1;
                Ok(n)
            })
            .unwrap();
            prev = next;
        }
        drop(prev);
        let p = pool.lock().unwrap();
        assert_eq!((p.allocs, p.reused), (2, 8));
    }
}
