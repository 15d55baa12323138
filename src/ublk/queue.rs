//! The body of one queue thread: a task per tag that fetches a request, serves it and
//! commits the result, all driven by the queue's own io_uring (no blocking syscall).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libublk::helpers::IoBuf;
use libublk::io::{with_task_io_ring_mut, UblkDev, UblkQueue};
use libublk::uring_async::{ublk_reap_io_events_with_update_queue, ublk_wake_task};
use libublk::{sys, BufDesc, UblkError};
use tracing::{debug, error, info_span, warn, Span};

use crate::engine::{SnapshotView, Volume};

use super::error::describe_ublk_error;
use super::executor::LocalExecutor;
use super::features::DataMode;
use super::io::{DataBuf, IoCtx, Request};
use super::worker::{mark_io_flusher, WorkSubmitter};

/// How long a stopping queue waits for its last tasks before giving up on them.
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
}

/// Runs queue `qid` of `dev` until the driver aborts it (device stopped or daemon
/// replaced). Never panics on kernel input; errors are logged.
pub fn run_queue(qid: u16, dev: &UblkDev, setup: &QueueSetup) {
    let span = info_span!(parent: &setup.span, "queue", qid);
    let _g = span.enter();
    // Counted on every way out, a panic included.
    let _exit = ExitCount(&setup.exited);
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

fn serve_queue(qid: u16, dev: &UblkDev, setup: &QueueSetup) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
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
    let ctx = Rc::new(IoCtx::new(
        setup.volume.clone(),
        setup.snapshot.clone(),
        setup.work.clone(),
        setup.mode,
        devzero,
    ));
    let exe = LocalExecutor::new();
    for tag in q.tags() {
        let ctx = ctx.clone();
        let q = q.clone();
        exe.spawn(async move {
            let r = match ctx.mode {
                DataMode::Copy => copy_task(&q, &ctx, tag).await,
                DataMode::ZeroCopy => zero_copy_task(&q, &ctx, tag).await,
            };
            match r {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => warn!(tag, error = %describe_ublk_error(&e), "tag task ended"),
            }
        });
    }
    event_loop(&q, &exe);
}

/// Serves requests of `tag` with a buffer of our own that the driver copies through.
async fn copy_task(q: &UblkQueue<'_>, ctx: &IoCtx, tag: u16) -> Result<(), UblkError> {
    let buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    let first = q
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    check_fetch(first)?;
    let data = DataBuf::Copy {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    };
    loop {
        let req = Request::from_iod(q.get_iod(tag));
        let res = ctx.handle(tag, req, data).await;
        let next = q
            .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
        check_fetch(next)?;
    }
}

/// Serves requests of `tag` in zero-copy mode: the driver registers each request's
/// pages at fixed-buffer index `tag` before handing it over, and unregisters them at
/// commit.
async fn zero_copy_task(q: &UblkQueue<'_>, ctx: &IoCtx, tag: u16) -> Result<(), UblkError> {
    let reg = sys::ublk_auto_buf_reg {
        index: tag,
        flags: 0,
        ..Default::default()
    };
    let first = q
        .submit_io_prep_cmd(tag, BufDesc::AutoReg(reg), 0, None)
        .await?;
    check_fetch(first)?;
    let data = DataBuf::Fixed { index: tag };
    loop {
        let req = Request::from_iod(q.get_iod(tag));
        let res = ctx.handle(tag, req, data).await;
        let next = q
            .submit_io_commit_cmd(tag, BufDesc::AutoReg(reg), res)
            .await?;
        check_fetch(next)?;
    }
}

/// A fetch result other than "request ready" ends the tag's task.
fn check_fetch(res: i32) -> Result<(), UblkError> {
    if res == sys::UBLK_IO_RES_OK as i32 {
        Ok(())
    } else if res == sys::UBLK_IO_RES_ABORT {
        Err(UblkError::QueueIsDown)
    } else {
        Err(UblkError::OtherError(if res < 0 {
            res
        } else {
            -libc::EPROTO
        }))
    }
}

/// Waits on the ring, wakes the tasks whose ops completed, runs them; until every task
/// has ended (the driver aborted the queue).
fn event_loop(q: &UblkQueue<'_>, exe: &LocalExecutor<'_>) {
    exe.run_ready();
    let mut stopping_since: Option<Instant> = None;
    let mut ring_errors = 0u32;
    while !exe.is_done() {
        let stopping = q.is_stopping();
        if stopping && stopping_since.is_none() {
            debug!(tasks = exe.live_tasks(), "queue stopping");
            stopping_since = Some(Instant::now());
        }
        let waited = with_task_io_ring_mut(|r| {
            if stopping {
                // Once stopping, the last tasks may wait on worker calls: poll gently.
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
                    return;
                }
            }
        }
        if let Err(e) = ublk_reap_io_events_with_update_queue(q, false, None, |cqe| {
            ublk_wake_task(cqe.user_data(), cqe)
        }) {
            warn!(error = %describe_ublk_error(&e), "reaping completions failed");
        }
        exe.run_ready();
        if let Some(t) = stopping_since {
            if t.elapsed() > STOP_GRACE && !exe.is_done() {
                error!(
                    tasks = exe.live_tasks(),
                    "queue stopped but some requests never finished; leaving them"
                );
                return;
            }
        }
    }
}
