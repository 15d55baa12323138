//! Blocking engine calls (FLUSH, DISCARD, WRITE_ZEROES) run on a few worker threads so
//! that queue threads never block: a worker runs the call and writes the result into
//! an eventfd that the waiting request is reading through its queue's io_uring.
//! Flushes go to one thread that coalesces every flush queued behind the one it runs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver, Sender};
use tracing::{debug, warn, Span};

use crate::engine::{EngineError, Volume};

use super::error::{Result, UblkLayerError};

/// How many threads serve discards and write-zeroes.
pub const MISC_WORKERS: usize = 2;

/// A blocking engine call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockingOp {
    /// `Volume::flush`.
    Flush,
    /// `Volume::discard(offset, len)`.
    Discard { offset: u64, len: u64 },
    /// `Volume::write_zeroes(offset, len)`.
    WriteZeroes { offset: u64, len: u64 },
}

/// Offset added to a result before it goes through the eventfd: the counter must be
/// non-zero, and results are 0 or a negative errno.
const RESULT_BIAS: i64 = 1 << 32;

/// Encodes a request result (0 or -errno) as an eventfd counter value.
pub fn encode_result(res: i32) -> u64 {
    // Results range over [-4095, 0], so the sum is positive.
    (i64::from(res) + RESULT_BIAS).unsigned_abs()
}

/// Decodes an eventfd counter value written by [`encode_result`].
pub fn decode_result(v: u64) -> i32 {
    let signed = i64::try_from(v).unwrap_or(i64::MAX) - RESULT_BIAS;
    i32::try_from(signed).unwrap_or(-libc::EIO)
}

/// Where a worker reports the result of one call: an eventfd the requester reads.
pub struct Completion {
    fd: OwnedFd,
}

impl Completion {
    /// A new blocking-mode eventfd (its reads are served by io_uring's poll path).
    pub fn new() -> std::io::Result<Completion> {
        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Completion {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The eventfd to read the encoded result from (8 bytes).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Publishes `res` to the reader.
    fn signal(&self, res: i32) {
        let v = encode_result(res).to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local array to our own eventfd.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), v.as_ptr().cast(), v.len()) };
        if n != 8 {
            // Only possible if the counter would overflow, which one writer per read
            // cannot cause; the request would hang, so make it loud.
            warn!(error = %std::io::Error::last_os_error(), "cannot signal a request's completion");
        }
    }
}

/// One call for a worker and where to report it.
struct Job {
    op: BlockingOp,
    /// Where the result goes; None for a flush nobody waits for.
    done: Option<Arc<Completion>>,
}

/// The workers are gone (the device is shutting down): the call was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the worker threads have stopped")]
pub struct WorkersStopped;

/// Hands blocking calls to the workers; cheap to clone, one per queue thread.
#[derive(Clone)]
pub struct WorkSubmitter {
    flush: Sender<Job>,
    misc: Sender<Job>,
}

impl WorkSubmitter {
    /// Queues `op`; its result will be written to `done`. Fails only once the workers
    /// have stopped.
    pub fn submit(
        &self,
        op: BlockingOp,
        done: Arc<Completion>,
    ) -> std::result::Result<(), WorkersStopped> {
        let tx = match op {
            BlockingOp::Flush => &self.flush,
            _ => &self.misc,
        };
        tx.send(Job {
            op,
            done: Some(done),
        })
        .map_err(|_| WorkersStopped)
    }

    /// Asks for a flush nobody waits for (the engine's unflushed changes pile up), unless
    /// one is queued already.
    pub fn flush_in_background(&self) {
        if self.flush.is_empty() {
            let _ = self.flush.send(Job {
                op: BlockingOp::Flush,
                done: None,
            });
        }
    }
}

/// The worker threads of one device.
pub struct Workers {
    submitter: Option<WorkSubmitter>,
    handles: Vec<JoinHandle<()>>,
}

/// Marks the calling thread as doing I/O on behalf of a block device, so memory
/// reclaim does not wait on our own device from inside it (as rublk does for queues).
pub fn mark_io_flusher() -> std::io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn errno_of(e: &EngineError) -> i32 {
    -e.errno().abs().max(1)
}

fn run_op(volume: &Volume, op: BlockingOp) -> i32 {
    let r = match op {
        BlockingOp::Flush => volume.flush(),
        BlockingOp::Discard { offset, len } => volume.discard(offset, len),
        BlockingOp::WriteZeroes { offset, len } => volume.write_zeroes(offset, len),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            warn!(?op, error = %e, "request failed");
            errno_of(&e)
        }
    }
}

/// The flush thread: runs one flush for every batch of queued flush requests. A flush
/// that starts after a request was queued covers every write completed before it.
fn flush_loop(volume: Volume, rx: Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let res = run_op(&volume, BlockingOp::Flush);
        if batch.len() > 1 {
            debug!(requests = batch.len(), "coalesced flushes");
        }
        for job in batch {
            if let Some(done) = job.done {
                done.signal(res);
            }
        }
    }
}

fn misc_loop(volume: Volume, rx: Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        let res = run_op(&volume, job.op);
        if let Some(done) = job.done {
            done.signal(res);
        }
    }
}

impl Workers {
    /// Starts the flush thread and `misc` discard/write-zeroes threads, logging in `span`.
    pub fn start(volume: &Volume, span: &Span, misc: usize) -> Result<Workers> {
        let (flush_tx, flush_rx) = channel::unbounded::<Job>();
        let (misc_tx, misc_rx) = channel::unbounded::<Job>();
        let mut handles = Vec::with_capacity(misc + 1);
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| -> Result<JoinHandle<()>> {
            let span = span.clone();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let _g = span.enter();
                    if let Err(e) = mark_io_flusher() {
                        warn!(error = %e, "cannot mark worker thread PR_SET_IO_FLUSHER");
                    }
                    f();
                })
                .map_err(|source| UblkLayerError::Sys {
                    op: "spawn worker thread",
                    source,
                })
        };
        let v = volume.clone();
        handles.push(spawn(
            "snapblk-flush".into(),
            Box::new(move || flush_loop(v, flush_rx)),
        )?);
        for i in 0..misc.max(1) {
            let v = volume.clone();
            let rx = misc_rx.clone();
            handles.push(spawn(
                format!("snapblk-work{i}"),
                Box::new(move || misc_loop(v, rx)),
            )?);
        }
        Ok(Workers {
            submitter: Some(WorkSubmitter {
                flush: flush_tx,
                misc: misc_tx,
            }),
            handles,
        })
    }

    /// A handle to queue calls.
    pub fn submitter(&self) -> Option<WorkSubmitter> {
        self.submitter.clone()
    }

    /// Stops accepting calls without waiting for the threads (for error paths where
    /// queue threads may still hold submitters); they end when the last one is gone.
    pub fn abandon(mut self) {
        self.submitter = None;
        self.handles.clear();
    }

    /// Stops accepting calls, lets the queued ones finish and joins the threads (after
    /// every queue thread, and so every clone of the submitter, is gone).
    pub fn shutdown(mut self) {
        self.submitter = None;
        for h in self.handles.drain(..) {
            if h.join().is_err() {
                warn!("a worker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_encoding_round_trips() {
        for res in [0, -1, -libc::EIO, -libc::ENOSPC, -4095] {
            let v = encode_result(res);
            assert_ne!(v, 0);
            assert_ne!(v, u64::MAX);
            assert_eq!(decode_result(v), res);
        }
        assert_eq!(decode_result(u64::MAX), -libc::EIO);
    }

    #[test]
    fn completion_signals_through_eventfd() {
        let c = Completion::new().expect("eventfd");
        c.signal(-libc::ENOSPC);
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a live local buffer from our own eventfd.
        let n = unsafe { libc::read(c.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(n, 8);
        assert_eq!(decode_result(u64::from_ne_bytes(buf)), -libc::ENOSPC);
    }

    fn read_result(c: &Completion) -> i32 {
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a live local buffer from our own eventfd.
        let n = unsafe { libc::read(c.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(n, 8);
        decode_result(u64::from_ne_bytes(buf))
    }

    #[test]
    fn workers_run_calls_against_a_volume() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("vol");
        let vol = crate::engine::Volume::create(
            &dir,
            &crate::engine::CreateOptions {
                size: 1 << 20,
                block_size: 4096,
            },
        )
        .expect("create volume");
        let span = tracing::info_span!("test");
        let workers = Workers::start(&vol, &span, 1).expect("start");
        let sub = workers.submitter().expect("submitter");
        let done = Arc::new(Completion::new().expect("eventfd"));
        sub.submit(BlockingOp::Flush, done.clone()).expect("submit");
        assert_eq!(read_result(&done), 0);
        sub.submit(
            BlockingOp::Discard {
                offset: 0,
                len: 8192,
            },
            done.clone(),
        )
        .expect("submit");
        assert_eq!(read_result(&done), 0);
        sub.submit(
            BlockingOp::WriteZeroes {
                offset: 4096,
                len: 4096,
            },
            done.clone(),
        )
        .expect("submit");
        assert_eq!(read_result(&done), 0);
        // Out of range: the engine's EINVAL comes back as -EINVAL.
        sub.submit(
            BlockingOp::Discard {
                offset: 1 << 20,
                len: 4096,
            },
            done.clone(),
        )
        .expect("submit");
        assert_eq!(read_result(&done), -libc::EINVAL);
        drop(sub);
        workers.shutdown();
    }
}
