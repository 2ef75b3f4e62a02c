//! A small persistent thread pool for data-parallel loops.
//!
//! `run(n, f)` calls `f(i)` for every `i < n`, spread over the pool's threads and the
//! calling thread, and returns when all calls are done. Workers spin briefly between
//! jobs (decode issues a job every few microseconds) and then sleep on a condvar, so an
//! idle pool costs nothing. Tasks are claimed with an atomic counter: uneven tasks
//! balance themselves.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// The job of epoch `epoch`; only dereferenced by a worker registered in `active`
    /// while `finished < epoch`.
    job: Mutex<Option<&'static Job>>,
    epoch: AtomicU64,
    /// The last epoch whose tasks are all done; late workers must not start it.
    finished: AtomicU64,
    next: AtomicUsize,
    n_tasks: AtomicUsize,
    done: AtomicUsize,
    /// Workers currently inside a job.
    active: AtomicUsize,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// Busy-wait rounds before yielding the core, and yields before sleeping. Decode issues
/// a job every few microseconds, so workers stay awake across a token; yielding keeps an
/// oversubscribed machine usable.
const SPINS: u32 = 2_000;
const YIELDS: u32 = 2_000;

/// Waits until `cond` holds: spin, then yield.
fn wait_until(cond: impl Fn() -> bool) {
    let mut n = 0u32;
    while !cond() {
        if n < SPINS {
            std::hint::spin_loop();
            n += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one).
    pub fn new(threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            epoch: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            n_tasks: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("caldera-cpu-{i}"))
                    .spawn(move || worker(s))
                    .expect("spawning a worker thread")
            })
            .collect();
        ThreadPool { shared, workers }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0..n)` in parallel and returns when every call has returned.
    pub fn run<F: Fn(usize) + Sync>(&self, n: usize, f: F) {
        if n == 0 {
            return;
        }
        if self.workers.is_empty() || n == 1 {
            (0..n).for_each(f);
            return;
        }
        let job: &(dyn Fn(usize) + Sync + '_) = &f;
        // SAFETY: workers dereference the job only while registered in `active` and
        // before `finished` reaches this epoch; `run` returns only after publishing
        // `finished` and then seeing `active == 0`, so `f` outlives every use.
        let job: &'static Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(job) };
        let s = &*self.shared;
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        s.next.store(0, Ordering::SeqCst);
        s.done.store(0, Ordering::SeqCst);
        s.n_tasks.store(n, Ordering::SeqCst);
        let epoch = s.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        loop {
            let i = s.next.fetch_add(1, Ordering::AcqRel);
            if i >= n {
                break;
            }
            f(i);
            s.done.fetch_add(1, Ordering::AcqRel);
        }
        wait_until(|| s.done.load(Ordering::Acquire) >= n);
        s.finished.store(epoch, Ordering::SeqCst);
        wait_until(|| s.active.load(Ordering::SeqCst) == 0);
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn worker(s: Arc<Shared>) {
    let mut seen = 0u64;
    loop {
        // Wait for a new epoch: spin, yield, then sleep.
        let mut n = 0u32;
        let epoch = loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::SeqCst);
            if e != seen {
                break e;
            }
            n += 1;
            if n < SPINS {
                std::hint::spin_loop();
            } else if n < SPINS + YIELDS {
                std::thread::yield_now();
            } else {
                let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                    let _g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                n = 0;
            }
        };
        seen = epoch;
        s.active.fetch_add(1, Ordering::SeqCst);
        if s.finished.load(Ordering::SeqCst) < epoch {
            let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(job) = job {
                let total = s.n_tasks.load(Ordering::Acquire);
                loop {
                    let i = s.next.fetch_add(1, Ordering::AcqRel);
                    if i >= total {
                        break;
                    }
                    job(i);
                    s.done.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw pointer that parallel tasks use to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: users guarantee that concurrent tasks write disjoint elements.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        let pool = ThreadPool::new(3);
        for n in [0usize, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn many_short_jobs() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        for _ in 0..10_000 {
            pool.run(4, |i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 10_000 * 6);
    }
}
