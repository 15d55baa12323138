//! Where the queue threads may run.
//!
//! libublk pins each queue thread to the CPUs that the kernel maps to its hardware
//! queue, the CPUs whose requests it serves. When a queue maps to one CPU (as many
//! queues as CPUs, the default on nodes of up to four), the thread then shares that CPU
//! with the very program that submits to it: submitting, serving and completing take
//! turns on one core while the others idle. By default the daemon lets its queue
//! threads run on every CPU it may use itself (its own affinity, so `taskset` and
//! cpusets still bound it), and the scheduler puts server and client side by side;
//! [`super::ServeOptions::pin_queues`] keeps libublk's placement.

use std::sync::Arc;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tracing::warn;

/// The thread ids of one device's queue threads, gathered as they start.
#[derive(Clone, Default)]
pub struct QueueThreads(Arc<Mutex<Vec<Pid>>>);

impl QueueThreads {
    /// Records the calling thread as a queue thread.
    pub fn register_current(&self) {
        self.0.lock().push(nix::unistd::gettid());
    }

    /// Lets every registered queue thread run on any CPU of `cpus`. Returns a short
    /// description of the CPUs for the log.
    pub fn allow(&self, cpus: &CpuSet) -> String {
        for &tid in self.0.lock().iter() {
            if let Err(e) = sched_setaffinity(tid, cpus) {
                warn!(tid = tid.as_raw(), error = %e, "cannot widen a queue thread's CPU affinity; it stays pinned");
            }
        }
        describe(cpus)
    }
}

/// The CPUs the calling thread may run on (before libublk narrows any queue thread,
/// the daemon's own), or None if the kernel does not say.
pub fn own_cpus() -> Option<CpuSet> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => Some(set),
        Err(e) => {
            warn!(error = %e, "cannot read the daemon's CPU affinity; queue threads stay pinned");
            None
        }
    }
}

/// `cpus` as a list of ranges, as taskset prints it: "0-3,6".
fn describe(cpus: &CpuSet) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(usize, usize)> = None;
    for cpu in 0..CpuSet::count() {
        if !cpus.is_set(cpu).unwrap_or(false) {
            continue;
        }
        run = match run {
            Some((first, last)) if last + 1 == cpu => Some((first, cpu)),
            Some(done) => {
                out.push(range(done));
                Some((cpu, cpu))
            }
            None => Some((cpu, cpu)),
        };
    }
    out.extend(run.map(range));
    out.join(",")
}

fn range((first, last): (usize, usize)) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cpus: &[usize]) -> CpuSet {
        let mut s = CpuSet::new();
        for &c in cpus {
            s.set(c).expect("cpu in range");
        }
        s
    }

    #[test]
    fn cpu_lists_read_like_taskset() {
        assert_eq!(describe(&set(&[0, 1, 2, 3])), "0-3");
        assert_eq!(describe(&set(&[0, 2, 3, 7])), "0,2-3,7");
        assert_eq!(describe(&set(&[5])), "5");
        assert_eq!(describe(&set(&[])), "");
    }

    #[test]
    fn registered_threads_get_the_allowed_cpus() {
        let own = own_cpus().expect("affinity");
        let first = (0..CpuSet::count())
            .find(|&c| own.is_set(c).unwrap_or(false))
            .expect("a cpu");
        let threads = QueueThreads::default();
        let t = threads.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            // Pinned to one CPU the way libublk pins a queue thread, then widened.
            sched_setaffinity(Pid::from_raw(0), &set(&[first])).expect("pin");
            t.register_current();
            tx.send(()).expect("send");
            go_rx.recv().expect("recv");
            sched_getaffinity(Pid::from_raw(0)).expect("get")
        });
        rx.recv().expect("registered");
        assert_eq!(threads.allow(&own), describe(&own));
        go_tx.send(()).expect("go");
        let after = h.join().expect("join");
        assert_eq!(describe(&after), describe(&own));
    }
}
