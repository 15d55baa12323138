//! The body of one queue thread: fetch commands for every tag, then one loop that waits
//! on the queue's own io_uring and hands each completion to the tag state machines
//! ([`super::tags`]), which commit results as requests finish. No blocking syscall but
//! the ring wait.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::IoUring;
use libublk::helpers::IoBuf;
use libublk::io::{
    ublk_init_task_ring, with_task_io_ring_mut, BufDescList, UblkDev, UblkIOCtx, UblkQueue,
};
use libublk::uring_async::ublk_reap_io_events_with_update_queue;
use libublk::{sys, BufDesc, UblkError, UblkIORes};
use tracing::{debug, error, info_span, warn, Span};

use crate::engine::{SnapshotView, Volume};
use crate::stats::IoStats;

use super::affinity::QueueThreads;
use super::error::describe_ublk_error;
use super::features::DataMode;
use super::io::{DataBuf, IoCtx, Request};
use super::tags::{Finish, TagTable, TARGET_OP};
use super::worker::{mark_io_flusher, WorkSubmitter};

/// How long a stopping queue waits for its last requests before giving up on them.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// What every queue thread needs; cloned into each (Send + Sync).
#[derive(Clone)]
pub struct QueueSetup {
    /// The volume served.
    pub volume: Volume,
    /// Set when the device serves this snapshot of the volume, read-only.
    pub snapshot: Option<SnapshotView>,
    /// Where blocking calls go.
    pub work: WorkSubmitter,
    /// Copy or zero copy (from the device's flags).
    pub mode: DataMode,
    /// The device's span (device id and volume name).
    pub span: Span,
    /// Counts queue threads that have ended, so the main thread notices an early end.
    pub exited: Arc<AtomicUsize>,
    /// Where each queue thread registers, so the main thread can place them.
    pub threads: QueueThreads,
    /// Where finished requests are counted, one set of counters per queue.
    pub stats: Arc<IoStats>,
}

/// Runs queue `qid` of `dev` until the driver aborts it (device stopped or daemon
/// replaced). Never panics on kernel input; errors are logged.
pub fn run_queue(qid: u16, dev: &UblkDev, setup: &QueueSetup) {
    let span = info_span!(parent: &setup.span, "queue", qid);
    let _g = span.enter();
    // Counted on every way out, a panic included.
    let _exit = ExitCount(&setup.exited);
    setup.threads.register_current();
    // libublk marks its queue threads already; repeated here so a refusal is logged
    // (without it, memory reclaim may wait on this very device).
    if let Err(e) = mark_io_flusher() {
        warn!(error = %e, "cannot mark the queue thread PR_SET_IO_FLUSHER");
    }
    serve_queue(qid, dev, setup);
    debug!("queue thread done");
}

/// Adds one to the count of ended queue threads when dropped.
struct ExitCount<'a>(&'a AtomicUsize);

impl Drop for ExitCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

fn open_devzero() -> std::io::Result<OwnedFd> {
    File::open("/dev/zero").map(OwnedFd::from)
}

/// Creates this thread's queue ring before libublk makes its default one, so that the
/// kernel runs completion work (the driver handing over requests, backing I/O ending)
/// only when the queue loop waits for it, in one batch, instead of interrupting the
/// thread for each (`IORING_SETUP_DEFER_TASKRUN`, Linux 6.1+; it needs a single issuer,
/// which a queue thread is). Falls back to libublk's ring if the kernel refuses.
fn init_queue_ring(dev: &UblkDev) {
    let (sq_depth, cq_depth) = (u32::from(dev.tgt.sq_depth), u32::from(dev.tgt.cq_depth));
    let made = ublk_init_task_ring(|cell| {
        if cell.get().is_some() {
            return Ok(());
        }
        let ring = IoUring::builder()
            .setup_cqsize(cq_depth)
            .setup_coop_taskrun()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(sq_depth)
            .map_err(UblkError::IOError)?;
        cell.set(RefCell::new(ring))
            .map_err(|_| UblkError::OtherError(-libc::EEXIST))
    });
    match made {
        Ok(()) => debug!("queue ring runs completion work when the queue waits"),
        Err(e) => debug!(
            error = %describe_ublk_error(&e),
            "kernel refuses a deferred-work ring; using the default ring"
        ),
    }
}

fn serve_queue(qid: u16, dev: &UblkDev, setup: &QueueSetup) {
    init_queue_ring(dev);
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            error!(error = %describe_ublk_error(&e), "cannot set up the queue");
            // Copy mode: make START_DEV fail instead of waiting for our buffers forever.
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    let devzero = match setup.mode {
        DataMode::ZeroCopy => match open_devzero() {
            Ok(f) => Some(f),
            Err(e) => {
                error!(error = %e, "cannot open /dev/zero");
                None
            }
        },
        DataMode::Copy => None,
    };
    let ctx = IoCtx::new(
        setup.volume.clone(),
        setup.snapshot.clone(),
        setup.work.clone(),
        devzero,
    );
    let bufs = match setup.mode {
        DataMode::Copy => TagBufs::Copy(dev.alloc_queue_io_bufs()),
        DataMode::ZeroCopy => TagBufs::ZeroCopy(
            q.tags()
                .map(|tag| sys::ublk_auto_buf_reg {
                    index: tag,
                    flags: 0,
                    ..Default::default()
                })
                .collect(),
        ),
    };
    let table = TagTable::new(ctx, bufs.data_bufs()).counting_into(setup.stats.clone(), qid);
    let q = match q.submit_fetch_commands_unified(bufs.fetch_list()) {
        Ok(q) => q,
        Err(e) => {
            error!(error = %describe_ublk_error(&e), "cannot fetch requests");
            return;
        }
    };
    let commit = Committer {
        q: &q,
        bufs: &bufs,
        unsent: Cell::new(0),
    };
    if !event_loop(&q, &table, &commit) {
        // Ops may still write into the buffers: never free them.
        std::mem::forget(table);
        std::mem::forget(bufs);
    }
}

/// Where each tag's request data lives, one entry per tag.
enum TagBufs {
    /// Copy mode: a buffer of ours that the driver copies request data through.
    Copy(Vec<IoBuf<u8>>),
    /// Zero copy: the driver registers each request's pages at fixed-buffer index
    /// `tag` before handing it over, and unregisters them at commit.
    ZeroCopy(Vec<sys::ublk_auto_buf_reg>),
}

impl TagBufs {
    /// Each tag's buffer as the requests address it, in tag order.
    fn data_bufs(&self) -> Vec<DataBuf> {
        match self {
            TagBufs::Copy(bufs) => bufs
                .iter()
                .map(|b| DataBuf::Copy {
                    ptr: b.as_mut_ptr(),
                    len: b.len(),
                })
                .collect(),
            TagBufs::ZeroCopy(regs) => regs
                .iter()
                .map(|r| DataBuf::Fixed { index: r.index })
                .collect(),
        }
    }

    /// What the first fetch of every tag hands the driver.
    fn fetch_list(&self) -> BufDescList<'_> {
        match self {
            TagBufs::Copy(bufs) => BufDescList::Slices(Some(bufs)),
            TagBufs::ZeroCopy(regs) => BufDescList::AutoRegs(regs),
        }
    }

    /// What the driver gets back with `tag`'s result.
    fn commit_desc(&self, tag: u16) -> Option<BufDesc<'_>> {
        match self {
            TagBufs::Copy(bufs) => bufs
                .get(usize::from(tag))
                .map(|b| BufDesc::Slice(b.as_slice())),
            TagBufs::ZeroCopy(regs) => regs.get(usize::from(tag)).map(|r| BufDesc::AutoReg(*r)),
        }
    }
}

/// Commits results to the driver (COMMIT_AND_FETCH), and counts the tags whose
/// commit was not sent because the queue is stopping.
struct Committer<'a> {
    q: &'a UblkQueue<'a>,
    bufs: &'a TagBufs,
    /// Tags ended by a stop while their request was being served.
    unsent: Cell<usize>,
}

impl Committer<'_> {
    /// The count of unsent commits since the last call.
    fn take_unsent(&self) -> usize {
        self.unsent.replace(0)
    }
}

impl Finish for Committer<'_> {
    fn finish(&self, tag: u16, res: i32) {
        // Once the queue is stopping, libublk drops commits (the driver has aborted
        // the queue and fails or requeues what it handed out): the tag is done.
        if self.q.is_stopping() {
            self.unsent.set(self.unsent.get() + 1);
            return;
        }
        let Some(desc) = self.bufs.commit_desc(tag) else {
            return;
        };
        if let Err(e) = self
            .q
            .complete_io_cmd_unified(tag, desc, Ok(UblkIORes::Result(res)))
        {
            // Only a descriptor that does not fit the device's mode; the request would
            // hang, so make it loud.
            error!(tag, error = %describe_ublk_error(&e), "cannot commit a request");
        }
    }
}

/// Waits on the ring and dispatches completions until the driver has ended every tag
/// (device stopped or daemon replaced). Returns false if it gave up with requests
/// still running, whose ops may yet complete into the tags' buffers.
fn event_loop(q: &UblkQueue<'_>, table: &TagTable, fin: &Committer<'_>) -> bool {
    // Tags not ended yet: neither aborted by the driver nor stopped mid-request.
    let mut live = q.nr_tags() as usize;
    let mut cqes: Vec<io_uring::cqueue::Entry> = Vec::with_capacity(2 * live);
    let mut stopping_since: Option<Instant> = None;
    let mut ring_errors = 0u32;
    while live > 0 {
        let stopping = q.is_stopping();
        if stopping && stopping_since.is_none() {
            debug!(tags = live, busy = table.busy(), "queue stopping");
            stopping_since = Some(Instant::now());
        }
        let waited = with_task_io_ring_mut(|r| {
            if stopping {
                // Once stopping, the last requests may wait on worker calls: poll gently.
                let ts = io_uring::types::Timespec::new().nsec(100_000_000);
                let args = io_uring::types::SubmitArgs::new().timespec(&ts);
                r.submitter().submit_with_args(1, &args)
            } else {
                r.submit_and_wait(1)
            }
        });
        match waited {
            Ok(_) => ring_errors = 0,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => {
                ring_errors += 1;
                warn!(error = %e, "waiting on the queue ring failed");
                if ring_errors > 100 {
                    error!("the queue ring keeps failing; giving up on this queue");
                    return table.busy() == 0;
                }
            }
        }
        // Collected first: handling a completion queues new entries on the same ring.
        cqes.clear();
        if let Err(e) =
            ublk_reap_io_events_with_update_queue(q, false, None, |cqe| cqes.push(cqe.clone()))
        {
            warn!(error = %describe_ublk_error(&e), "reaping completions failed");
        }
        for cqe in &cqes {
            let data = cqe.user_data();
            let res = cqe.result();
            if data & TARGET_OP != 0 {
                table.complete(data, res, fin);
                continue;
            }
            // A driver command: the tag has a new request, or it is done.
            let tag = UblkIOCtx::user_data_to_tag(data) as u16;
            if res == sys::UBLK_IO_RES_OK as i32 && q.owns_tag(tag) {
                table.start(tag, Request::from_iod(q.get_iod(tag)), fin);
            } else {
                live = live.saturating_sub(1);
                if res != sys::UBLK_IO_RES_ABORT {
                    warn!(tag, res, "the driver ended a tag with an unexpected result");
                }
            }
        }
        live = live.saturating_sub(fin.take_unsent());
        if let Some(t) = stopping_since {
            if t.elapsed() > STOP_GRACE && live > 0 {
                error!(
                    tags = live,
                    busy = table.busy(),
                    "queue stopped but some requests never finished; leaving them"
                );
                return table.busy() == 0;
            }
        }
    }
    true
}
