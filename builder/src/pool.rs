//! An ordered worker pool: jobs `0..n` run on a few threads, results come back in job order,
//! and at most `window` finished-or-running jobs wait ahead of the consumer (bounded memory).
//! Dropping the iterator stops the workers after their current job.

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};

struct State {
    next: usize,
    consumed: usize,
    stop: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// Results of the jobs, in job order.
pub struct Ordered<T> {
    jobs: usize,
    shared: Shared,
    rx: Option<Receiver<(usize, Result<T>)>>,
    pending: BTreeMap<usize, Result<T>>,
    workers: Vec<JoinHandle<()>>,
}

/// How many threads to use for CPU-bound work.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `work(i)` for every `i` in `0..jobs` on `threads` threads.
pub fn ordered<T, F>(jobs: usize, threads: usize, window: usize, work: F) -> Ordered<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Result<T> + Send + Sync + 'static,
{
    let shared: Shared = Arc::new((
        Mutex::new(State {
            next: 0,
            consumed: 0,
            stop: false,
        }),
        Condvar::new(),
    ));
    let window = window.max(threads).max(1);
    let work = Arc::new(work);
    let (tx, rx) = channel();
    let workers = (0..threads.clamp(1, jobs.max(1)))
        .map(|_| {
            let shared = shared.clone();
            let work = work.clone();
            let tx = tx.clone();
            std::thread::spawn(move || loop {
                let i = {
                    let (lock, cv) = &*shared;
                    let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while !st.stop && st.next < jobs && st.next >= st.consumed + window {
                        st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    if st.stop || st.next >= jobs {
                        return;
                    }
                    st.next += 1;
                    st.next - 1
                };
                if tx.send((i, work(i))).is_err() {
                    return;
                }
            })
        })
        .collect();
    Ordered {
        jobs,
        shared,
        rx: Some(rx),
        pending: BTreeMap::new(),
        workers,
    }
}

impl<T> Iterator for Ordered<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        let want = self
            .shared
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .consumed;
        if want >= self.jobs {
            return None;
        }
        let item = loop {
            if let Some(r) = self.pending.remove(&want) {
                break r;
            }
            match self.rx.as_ref().map(Receiver::recv) {
                Some(Ok((i, r))) => {
                    self.pending.insert(i, r);
                }
                _ => break Err(anyhow!("a worker thread stopped before its job was done")),
            }
        };
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).consumed += 1;
        cv.notify_all();
        Some(item)
    }
}

impl<T> Drop for Ordered<T> {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_all();
        self.rx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn results_come_in_order_and_the_window_bounds_the_work_ahead() {
        let ahead = Arc::new(AtomicUsize::new(0));
        let seen = ahead.clone();
        let got: Vec<usize> = ordered(50, 4, 6, move |i| {
            seen.fetch_max(i, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis((i % 3) as u64));
            Ok(i * 2)
        })
        .map(|r| r.expect("job"))
        .collect();
        assert_eq!(got, (0..50).map(|i| i * 2).collect::<Vec<_>>());

        // Taking one result lets at most `window` jobs start beyond it.
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let mut it = ordered(100, 2, 4, move |i| {
            s.fetch_max(i + 1, Ordering::SeqCst);
            Ok(i)
        });
        assert_eq!(it.next().map(|r| r.expect("job")), Some(0));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            started.load(Ordering::SeqCst) <= 5,
            "ran ahead of the window"
        );
        drop(it);
    }

    #[test]
    fn an_error_is_returned_in_its_place() {
        let r: Vec<Result<usize>> = ordered(5, 2, 2, |i| {
            if i == 3 {
                anyhow::bail!("job 3 failed")
            }
            Ok(i)
        })
        .collect();
        assert!(r[..3].iter().all(|x| x.is_ok()));
        assert_eq!(
            format!("{}", r[3].as_ref().expect_err("3 fails")),
            "job 3 failed"
        );
    }
}
