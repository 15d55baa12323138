//! The requests of one queue, served from completions. Each tag is a small state
//! machine that the queue loop advances when the driver hands the tag a request or when
//! one of the tag's ring ops completes: READ = one op per plan segment, WRITE = one op
//! into the head layer (then a worker flush for FUA), FLUSH / DISCARD / WRITE_ZEROES =
//! a worker call whose result comes back through an eventfd read on the same ring.
//!
//! There is no future, waker or allocation per request: an op's user data names its
//! tag and the part it moves, and the tag's slot holds everything the request needs
//! until its last op is back.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types};
use libublk::sys;
use tracing::{debug, warn};

use crate::engine::{ReadPlan, ReadSource, WriteTicket};
use crate::stats::{Direction, IoStats};

use super::io::{
    bytes_result, neg_errno, outcome, push_op, retryable, DataBuf, IoCtx, Outcome, Piece, Pieces,
    Request, MAX_RETRIES,
};
use super::worker::{decode_result, BlockingOp, Completion};

/// Marks the user data of our ring ops (libublk's target-I/O bit): the driver's
/// commands on the same ring have it clear.
pub const TARGET_OP: u64 = libublk::UblkUringData::Target as u64;

/// User data of the op of `tag` moving part `piece` of its request.
fn op_data(tag: u16, piece: usize) -> u64 {
    // Requests are at most a few MiB, so a plan has far fewer than 2^16 parts.
    TARGET_OP | ((piece as u64 & 0xffff) << 16) | u64::from(tag)
}

fn op_tag(data: u64) -> u16 {
    (data & 0xffff) as u16
}

fn op_piece(data: u64) -> usize {
    ((data >> 16) & 0xffff) as usize
}

/// Reports a request's result to the driver (commit and fetch the tag's next one).
pub trait Finish {
    /// `res` is the byte count, 0, or -errno.
    fn finish(&self, tag: u16, res: i32);
}

/// Where a tag's request stands (the rest follows from the request itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// No request (waiting for the driver).
    Idle,
    /// Ops moving the parts in `pieces` are in flight, in the request's direction.
    Transfer,
    /// A worker runs a blocking call; an eventfd read waits for its result. For a
    /// write, that call is its FUA flush.
    Worker,
}

/// What keeps the request's files and map state alive while its ops run.
enum Hold {
    Nothing,
    /// A read: the plan keeps the layer files open.
    Plan {
        _files: ReadPlan,
    },
    /// A write: completed into the map once the data is in the file.
    Ticket(WriteTicket),
}

/// One tag's request and the state of its ops.
struct Slot {
    /// The tag's data buffer (fixed for the life of the queue).
    buf: DataBuf,
    req: Request,
    stage: Stage,
    /// The parts of the current transfer; an op's user data holds its index here.
    pieces: Pieces,
    /// Ops submitted and not yet completed.
    inflight: usize,
    /// The first error of the request, 0 if none.
    err: i32,
    /// Ops resubmitted so far (EAGAIN, short transfers).
    retries: u32,
    hold: Hold,
    /// The eventfd a worker reports to, while one runs for this tag.
    waiter: Option<Arc<Completion>>,
    /// Where the eventfd read lands.
    val: [u8; 8],
    /// When the driver handed the request over (for its latency).
    started: Instant,
}

/// The state machines of every tag of one queue.
pub struct TagTable {
    ctx: IoCtx,
    /// Never resized: ring ops point into slots (the eventfd value).
    slots: Box<[RefCell<Slot>]>,
    /// Idle eventfds for blocking calls, reused from request to request.
    completions: RefCell<Vec<Arc<Completion>>>,
    /// Where finished requests are counted, and this queue's index there.
    stats: Arc<IoStats>,
    qid: usize,
}

impl TagTable {
    /// One slot per tag; `bufs` yields each tag's buffer in tag order.
    pub fn new(ctx: IoCtx, bufs: impl IntoIterator<Item = DataBuf>) -> TagTable {
        let slots = bufs
            .into_iter()
            .map(|buf| {
                RefCell::new(Slot {
                    buf,
                    req: Request::default(),
                    stage: Stage::Idle,
                    pieces: Pieces::new(),
                    inflight: 0,
                    err: 0,
                    retries: 0,
                    hold: Hold::Nothing,
                    waiter: None,
                    val: [0; 8],
                    started: Instant::now(),
                })
            })
            .collect();
        TagTable {
            ctx,
            slots,
            completions: RefCell::new(Vec::new()),
            stats: Arc::new(IoStats::new(1)),
            qid: 0,
        }
    }

    /// The same table, counting finished requests as queue `qid` of `stats`.
    pub fn counting_into(mut self, stats: Arc<IoStats>, qid: u16) -> TagTable {
        self.stats = stats;
        self.qid = usize::from(qid);
        self
    }

    /// How many tags have a request in progress (ops or a worker call outstanding).
    pub fn busy(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.borrow().stage != Stage::Idle)
            .count()
    }

    /// The driver handed `tag` the request `req`: start serving it.
    pub fn start(&self, tag: u16, req: Request, fin: &impl Finish) {
        let Some(cell) = self.slots.get(usize::from(tag)) else {
            warn!(tag, "request for a tag the queue does not have; ignored");
            return;
        };
        let res = {
            let mut s = cell.borrow_mut();
            if s.stage != Stage::Idle {
                // The driver never reuses a tag before its commit; keep the old ops'
                // buffers safe rather than guess.
                warn!(tag, stage = ?s.stage, "request for a busy tag; ignored");
                return;
            }
            s.req = req;
            s.err = 0;
            s.retries = 0;
            s.started = Instant::now();
            self.begin(tag, &mut s)
        };
        if let Some(res) = res {
            self.finish(tag, res, fin);
        }
    }

    /// The ring op with user data `data` completed with `res`.
    pub fn complete(&self, data: u64, res: i32, fin: &impl Finish) {
        let tag = op_tag(data);
        let Some(cell) = self.slots.get(usize::from(tag)) else {
            warn!(tag, "completion for a tag the queue does not have; ignored");
            return;
        };
        let done = {
            let mut s = cell.borrow_mut();
            match s.stage {
                Stage::Transfer => self.transfer_step(tag, &mut s, op_piece(data), res),
                Stage::Worker => self.worker_step(tag, &mut s, res),
                Stage::Idle => {
                    warn!(tag, res, "completion for an idle tag; ignored");
                    None
                }
            }
        };
        if let Some(res) = done {
            self.finish(tag, res, fin);
        }
    }

    /// Ends the request of `tag` with `res` and hands the result to the driver.
    fn finish(&self, tag: u16, res: i32, fin: &impl Finish) {
        let (req, started) = {
            let mut s = self.slots[usize::from(tag)].borrow_mut();
            s.stage = Stage::Idle;
            s.hold = Hold::Nothing;
            (s.req, s.started)
        };
        if let Some(dir) = direction(req.op) {
            self.stats
                .queue(self.qid)
                .record(dir, req.len, res < 0, started.elapsed());
        }
        if res < 0 {
            debug!(
                tag,
                op = req.op,
                offset = req.offset,
                len = req.len,
                res,
                "request failed"
            );
            // A full or failing disk under the folder shows in `status` (the engine
            // counts what fails in its own calls: flushes, discards).
            let ring_op = matches!(req.op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE);
            if ring_op && matches!(-res, libc::ENOSPC | libc::EDQUOT | libc::EIO | libc::EROFS) {
                let what = format!(
                    "{} at byte {} ({} bytes): {}",
                    op_name(req.op),
                    req.offset,
                    req.len,
                    std::io::Error::from_raw_os_error(-res)
                );
                self.ctx.volume.note_request_error(res, &what);
            }
        }
        fin.finish(tag, res);
    }

    /// Starts the request in `s`; Some(result) if it is done at once.
    fn begin(&self, tag: u16, s: &mut Slot) -> Option<i32> {
        let req = s.req;
        let read_only = self.ctx.snapshot.is_some();
        match req.op {
            sys::UBLK_IO_OP_READ => {
                let planned = match &self.ctx.snapshot {
                    Some(view) => view.plan_read(req.offset, req.len),
                    None => self.ctx.volume.plan_read(req.offset, req.len),
                };
                let mut plan = match planned {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(offset = req.offset, len = req.len, error = %e, "read refused");
                        return Some(neg_errno(&e));
                    }
                };
                s.pieces = std::mem::take(&mut plan.segments);
                // The plan keeps the layer files open until every op on them completed.
                s.hold = Hold::Plan { _files: plan };
                self.transfer(tag, s)
            }
            // A snapshot device is marked read-only, so the kernel refuses writes first;
            // this is the second line. It has nothing to flush.
            sys::UBLK_IO_OP_FLUSH if read_only => Some(0),
            sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES
                if read_only =>
            {
                Some(-libc::EROFS)
            }
            sys::UBLK_IO_OP_WRITE => {
                let ticket = match self.ctx.volume.begin_write(req.offset, req.len) {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(offset = req.offset, len = req.len, error = %e, "write refused");
                        return Some(neg_errno(&e));
                    }
                };
                s.pieces.clear();
                let fd = ticket.fd();
                s.pieces
                    .extend(ticket.pieces().map(|(buf_offset, len, offset)| Piece {
                        buf_offset,
                        len,
                        source: ReadSource::File { fd, offset },
                    }));
                // Dropped uncompleted on failure: the map stays as it was.
                s.hold = Hold::Ticket(ticket);
                self.transfer(tag, s)
            }
            _ => match blocking_op(&req) {
                Some(op) => self.to_worker(tag, s, op),
                None => Some(-libc::EOPNOTSUPP),
            },
        }
    }

    /// Submits one op per part in `s.pieces`, all in flight together.
    fn transfer(&self, tag: u16, s: &mut Slot) -> Option<i32> {
        s.stage = Stage::Transfer;
        s.inflight = 0;
        for i in 0..s.pieces.len() {
            let p = s.pieces[i];
            if !self.submit_piece(tag, s, i, &p) {
                break;
            }
        }
        if s.inflight > 0 {
            return None;
        }
        self.transfer_end(tag, s)
    }

    /// Submits the op moving `p` (part `i`); false if the request failed instead.
    fn submit_piece(&self, tag: u16, s: &mut Slot, i: usize, p: &Piece) -> bool {
        match self.ctx.build_op(s.req.dir(), s.buf, p) {
            Ok(Some(sqe)) => {
                // SAFETY: the tag's buffer lives as long as the queue, and the layer file
                // is kept open by `s.hold`, which is released only after the last op of
                // the request has completed.
                unsafe { push_op(&sqe.user_data(op_data(tag, i))) };
                s.inflight += 1;
                true
            }
            Ok(None) => true,
            Err(e) => {
                s.err = e;
                false
            }
        }
    }

    /// One op of a transfer completed with `res`.
    fn transfer_step(&self, tag: u16, s: &mut Slot, i: usize, res: i32) -> Option<i32> {
        let Some(p) = s.pieces.get(i).copied() else {
            warn!(
                tag,
                piece = i,
                "completion for a part the request does not have"
            );
            return None;
        };
        s.inflight = s.inflight.saturating_sub(1);
        if s.err == 0 {
            match outcome(s.req.dir(), &p, res) {
                Outcome::Done => {}
                Outcome::Failed(e) => s.err = e,
                Outcome::Again(rest) => {
                    s.retries += 1;
                    if s.retries > MAX_RETRIES {
                        s.err = -libc::EAGAIN;
                    } else {
                        s.pieces[i] = rest;
                        self.submit_piece(tag, s, i, &rest);
                    }
                }
            }
        }
        if s.inflight > 0 {
            return None;
        }
        self.transfer_end(tag, s)
    }

    /// Every op of the transfer is back: the request's result, or its next step.
    fn transfer_end(&self, tag: u16, s: &mut Slot) -> Option<i32> {
        let hold = std::mem::replace(&mut s.hold, Hold::Nothing);
        if s.err != 0 {
            return Some(s.err);
        }
        if let Hold::Ticket(ticket) = hold {
            // Not acknowledged unless recorded: the volatile journal may refuse (a full
            // /dev/shm), and the request then fails with that error.
            match ticket.complete() {
                Ok(true) => self.ctx.work.flush_in_background(),
                Ok(false) => {}
                Err(e) => {
                    warn!(offset = s.req.offset, len = s.req.len, error = %e, "write not recorded");
                    return Some(neg_errno(&e));
                }
            }
            if s.req.fua() {
                return self.to_worker(tag, s, BlockingOp::Flush);
            }
        }
        Some(bytes_result(s.req.len))
    }

    /// Hands `op` to a worker and reads its result from an eventfd on the ring.
    fn to_worker(&self, tag: u16, s: &mut Slot, op: BlockingOp) -> Option<i32> {
        let done = match self.completions.borrow_mut().pop() {
            Some(c) => c,
            None => match Completion::new() {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    warn!(error = %e, "cannot create an eventfd");
                    return Some(-e.raw_os_error().unwrap_or(libc::ENOMEM));
                }
            },
        };
        if self.ctx.work.submit(op, done.clone()).is_err() {
            // Not queued, so nobody writes to it: reusable.
            self.completions.borrow_mut().push(done);
            return Some(-libc::EIO);
        }
        s.waiter = Some(done);
        s.stage = Stage::Worker;
        s.retries = 0;
        self.read_waiter(tag, s);
        None
    }

    /// Queues the 8-byte read of the worker's eventfd into `s.val`.
    fn read_waiter(&self, tag: u16, s: &mut Slot) {
        let Some(fd) = s.waiter.as_ref().map(|w| w.fd()) else {
            return;
        };
        let sqe = opcode::Read::new(types::Fd(fd), s.val.as_mut_ptr(), 8)
            .build()
            .user_data(op_data(tag, 0));
        // SAFETY: `s.val` lives in a slot that is never moved or freed while the queue
        // runs, and the eventfd is kept open by `s.waiter` until the read completes.
        unsafe { push_op(&sqe) };
    }

    /// The eventfd read of a worker call completed with `res`.
    fn worker_step(&self, tag: u16, s: &mut Slot, res: i32) -> Option<i32> {
        if retryable(res) && s.retries < MAX_RETRIES {
            s.retries += 1;
            self.read_waiter(tag, s);
            return None;
        }
        let waiter = s.waiter.take();
        if res != 8 {
            // The worker may still write to this eventfd: never reuse it.
            warn!(tag, res, req = ?s.req, "waiting for a worker failed");
            return Some(if res < 0 { res } else { -libc::EIO });
        }
        if let Some(w) = waiter {
            self.completions.borrow_mut().push(w);
        }
        let r = decode_result(u64::from_ne_bytes(s.val));
        // A write's worker call is its FUA flush: once durable, the write is done.
        Some(if s.req.op == sys::UBLK_IO_OP_WRITE && r >= 0 {
            bytes_result(s.req.len)
        } else {
            r
        })
    }
}

/// How a request of ublk op `op` is counted; None for ops the device does not serve.
/// The name of ublk operation `op`, for messages.
fn op_name(op: u32) -> &'static str {
    match op {
        sys::UBLK_IO_OP_READ => "read",
        sys::UBLK_IO_OP_WRITE => "write",
        _ => "request",
    }
}

fn direction(op: u32) -> Option<Direction> {
    match op {
        sys::UBLK_IO_OP_READ => Some(Direction::Read),
        sys::UBLK_IO_OP_WRITE => Some(Direction::Write),
        sys::UBLK_IO_OP_FLUSH => Some(Direction::Flush),
        sys::UBLK_IO_OP_DISCARD => Some(Direction::Discard),
        sys::UBLK_IO_OP_WRITE_ZEROES => Some(Direction::WriteZeroes),
        _ => None,
    }
}

/// The worker call serving `req`, for the requests served by one.
fn blocking_op(req: &Request) -> Option<BlockingOp> {
    let (offset, len) = (req.offset, req.len);
    match req.op {
        sys::UBLK_IO_OP_FLUSH => Some(BlockingOp::Flush),
        sys::UBLK_IO_OP_DISCARD => Some(BlockingOp::Discard { offset, len }),
        sys::UBLK_IO_OP_WRITE_ZEROES => Some(BlockingOp::WriteZeroes { offset, len }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CreateOptions, Volume};
    use crate::ublk::worker::{WorkSubmitter, Workers};
    use io_uring::IoUring;
    use libublk::io::with_task_io_ring_mut;

    /// Sets up this thread's ring the way a queue thread has it (libublk's slot).
    fn init_ring() {
        libublk::io::ublk_init_task_ring(|cell| {
            if cell.get().is_none() {
                let ring = IoUring::builder()
                    .build(64)
                    .map_err(libublk::UblkError::IOError)?;
                cell.set(RefCell::new(ring))
                    .map_err(|_| libublk::UblkError::OtherError(-libc::EEXIST))?;
            }
            Ok(())
        })
        .expect("ring");
    }

    /// Records results the way the driver would receive them.
    #[derive(Default)]
    struct Results(RefCell<Vec<(u16, i32)>>);

    impl Finish for Results {
        fn finish(&self, tag: u16, res: i32) {
            self.0.borrow_mut().push((tag, res));
        }
    }

    /// Runs the ring the way the queue loop does until `n` requests have finished.
    fn drive(table: &TagTable, fin: &Results, n: usize) {
        while fin.0.borrow().len() < n {
            with_task_io_ring_mut(|r| r.submit_and_wait(1)).expect("wait");
            let cqes: Vec<io_uring::cqueue::Entry> =
                with_task_io_ring_mut(|r| r.completion().collect());
            for cqe in &cqes {
                assert_ne!(cqe.user_data() & TARGET_OP, 0, "only our ops on this ring");
                table.complete(cqe.user_data(), cqe.result(), fin);
            }
        }
        assert_eq!(table.busy(), 0, "every request finished");
    }

    fn copy_buf(buf: &mut [u8]) -> DataBuf {
        DataBuf::Copy {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    fn request(op: u32, offset: u64, len: u64) -> Request {
        Request {
            op,
            flags: op,
            offset,
            len,
        }
    }

    /// Serves one request through a one-tag table whose buffer is `buf`.
    fn call(ctx: IoCtx, req: Request, buf: &mut [u8]) -> i32 {
        let table = TagTable::new(ctx, [copy_buf(buf)]);
        let fin = Results::default();
        table.start(0, req, &fin);
        drive(&table, &fin, 1);
        let out = fin.0.borrow();
        assert_eq!(out.len(), 1, "one result per request");
        out[0].1
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        volume: Volume,
        workers: Option<Workers>,
        work: WorkSubmitter,
    }

    impl Fixture {
        fn new() -> Fixture {
            init_ring();
            let tmp = tempfile::tempdir().expect("tempdir");
            let volume = Volume::create(
                &tmp.path().join("vol"),
                &CreateOptions {
                    size: 1 << 20,
                    block_size: 4096,
                },
            )
            .expect("volume");
            let span = tracing::info_span!("test");
            let workers = Workers::start(&volume, &span, 1).expect("workers");
            let work = workers.submitter().expect("submitter");
            Fixture {
                _tmp: tmp,
                volume,
                workers: Some(workers),
                work,
            }
        }

        /// What a copy-mode queue of the live volume serves with.
        fn ctx(&self) -> IoCtx {
            IoCtx::new(self.volume.clone(), None, self.work.clone(), None)
        }

        fn req(&self, op: u32, offset: u64, len: u64, buf: &mut [u8]) -> i32 {
            call(self.ctx(), request(op, offset, len), buf)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            if let Some(w) = self.workers.take() {
                w.abandon();
            }
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn write_then_read_through_the_ring() {
        let f = Fixture::new();
        let mut data = pattern(8192, 7);
        assert_eq!(f.req(sys::UBLK_IO_OP_WRITE, 4096, 8192, &mut data), 8192);
        let mut check = vec![0u8; 8192];
        f.volume.read(4096, &mut check).expect("engine read");
        assert_eq!(check, data);

        // A read spanning written and never-written blocks: zeros around the data.
        let mut buf = vec![0xAAu8; 16384];
        assert_eq!(f.req(sys::UBLK_IO_OP_READ, 0, 16384, &mut buf), 16384);
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert_eq!(&buf[4096..12288], &data[..]);
        assert!(buf[12288..].iter().all(|&b| b == 0));
    }

    #[test]
    fn finished_requests_are_counted_by_direction() {
        let f = Fixture::new();
        let stats = Arc::new(IoStats::new(2));
        let mut buf = pattern(16384, 3);
        let table = TagTable::new(f.ctx(), [copy_buf(&mut buf)]).counting_into(stats.clone(), 1);
        let fin = Results::default();
        let reqs = [
            request(sys::UBLK_IO_OP_WRITE, 0, 8192),
            request(sys::UBLK_IO_OP_WRITE, 4096, 4096),
            request(sys::UBLK_IO_OP_READ, 0, 16384),
            request(sys::UBLK_IO_OP_FLUSH, 0, 0),
            request(sys::UBLK_IO_OP_DISCARD, 0, 4096),
            // Past the end of the 1 MiB volume: refused, counted as an error.
            request(sys::UBLK_IO_OP_WRITE, 1 << 20, 4096),
        ];
        for (i, r) in reqs.into_iter().enumerate() {
            table.start(0, r, &fin);
            drive(&table, &fin, i + 1);
        }
        let results: Vec<i32> = fin.0.borrow().iter().map(|&(_, r)| r).collect();
        assert_eq!(&results[..5], &[8192, 4096, 16384, 0, 0]);
        assert!(results[5] < 0, "{results:?}");
        let s = stats.snapshot();
        let w = &s["write"];
        assert_eq!((w.requests, w.errors, w.bytes), (3, 1, 12288));
        assert_eq!(w.latency.count(), 3);
        let r = &s["read"];
        assert_eq!((r.requests, r.errors, r.bytes), (1, 0, 16384));
        assert_eq!(s["flush"].requests, 1);
        assert_eq!((s["discard"].requests, s["discard"].bytes), (1, 4096));
        assert_eq!(s["write_zeroes"].requests, 0);
        // Only queue 1 counted: queue 0 of the same stats saw nothing.
        assert_eq!(stats.queue(1).requests(), 6);
        assert_eq!(stats.queue(0).requests(), 0);
    }

    #[test]
    fn reads_segments_from_several_layers() {
        let f = Fixture::new();
        let mut old = pattern(16384, 1);
        assert_eq!(f.req(sys::UBLK_IO_OP_WRITE, 0, 16384, &mut old), 16384);
        f.volume.create_snapshot("s1").expect("snapshot");
        let mut new = pattern(4096, 99);
        assert_eq!(f.req(sys::UBLK_IO_OP_WRITE, 8192, 4096, &mut new), 4096);
        let plan = f.volume.plan_read(0, 16384).expect("plan");
        assert!(plan.segments.len() >= 3, "expected a multi-segment plan");
        drop(plan);
        let mut buf = vec![0u8; 16384];
        assert_eq!(f.req(sys::UBLK_IO_OP_READ, 0, 16384, &mut buf), 16384);
        assert_eq!(&buf[..8192], &old[..8192]);
        assert_eq!(&buf[8192..12288], &new[..]);
        assert_eq!(&buf[12288..], &old[12288..]);
    }

    #[test]
    fn many_tags_in_flight_at_once() {
        let f = Fixture::new();
        const TAGS: usize = 32;
        const LEN: usize = 8192;
        let mut bufs: Vec<Vec<u8>> = (0..TAGS).map(|t| pattern(LEN, t as u8)).collect();
        let table = TagTable::new(
            f.ctx(),
            bufs.iter_mut().map(|b| copy_buf(b)).collect::<Vec<_>>(),
        );
        // Every tag writes its own range, all before any completion is reaped; half
        // of them with FUA, so worker calls and ring ops interleave.
        let fin = Results::default();
        for tag in 0..TAGS as u16 {
            let mut r = request(
                sys::UBLK_IO_OP_WRITE,
                u64::from(tag) * LEN as u64,
                LEN as u64,
            );
            if tag % 2 == 0 {
                r.flags |= sys::UBLK_IO_F_FUA;
            }
            table.start(tag, r, &fin);
        }
        drive(&table, &fin, TAGS);
        let mut done = fin.0.borrow().clone();
        done.sort_unstable();
        let expected: Vec<(u16, i32)> = (0..TAGS as u16).map(|t| (t, LEN as i32)).collect();
        assert_eq!(done, expected);
        for (tag, want) in bufs.iter().enumerate() {
            let mut got = vec![0u8; LEN];
            f.volume.read((tag * LEN) as u64, &mut got).expect("read");
            assert_eq!(&got, want, "tag {tag}");
        }
        // Read them back crosswise: tag t reads the range tag TAGS-1-t wrote.
        let want: Vec<Vec<u8>> = bufs.clone();
        for b in bufs.iter_mut() {
            b.fill(0xEE);
        }
        let fin = Results::default();
        for tag in 0..TAGS as u16 {
            let from = TAGS as u64 - 1 - u64::from(tag);
            table.start(
                tag,
                request(sys::UBLK_IO_OP_READ, from * LEN as u64, LEN as u64),
                &fin,
            );
        }
        drive(&table, &fin, TAGS);
        assert!(fin.0.borrow().iter().all(|&(_, r)| r == LEN as i32));
        for (tag, b) in bufs.iter().enumerate() {
            assert_eq!(b, &want[TAGS - 1 - tag], "tag {tag}");
        }
    }

    #[test]
    fn snapshot_device_reads_the_snapshot_and_refuses_writes() {
        let f = Fixture::new();
        let mut old = pattern(8192, 5);
        assert_eq!(f.req(sys::UBLK_IO_OP_WRITE, 0, 8192, &mut old), 8192);
        f.volume.create_snapshot("s1").expect("snapshot");
        let mut new = pattern(4096, 77);
        assert_eq!(f.req(sys::UBLK_IO_OP_WRITE, 0, 4096, &mut new), 4096);
        let view = f.volume.snapshot_view("s1").expect("view");
        let call = |op: u32, offset: u64, len: u64, buf: &mut [u8]| {
            let ctx = IoCtx::new(f.volume.clone(), Some(view.clone()), f.work.clone(), None);
            call(ctx, request(op, offset, len), buf)
        };
        let mut buf = vec![0u8; 8192];
        assert_eq!(call(sys::UBLK_IO_OP_READ, 0, 8192, &mut buf), 8192);
        assert_eq!(buf, old, "the snapshot device must read the snapshot");
        for op in [
            sys::UBLK_IO_OP_WRITE,
            sys::UBLK_IO_OP_DISCARD,
            sys::UBLK_IO_OP_WRITE_ZEROES,
        ] {
            assert_eq!(call(op, 0, 4096, &mut buf), -libc::EROFS, "op {op}");
        }
        assert_eq!(call(sys::UBLK_IO_OP_FLUSH, 0, 0, &mut []), 0);
        // The live volume kept its newer data.
        let mut live = vec![0u8; 4096];
        f.volume.read(0, &mut live).expect("read");
        assert_eq!(live, new);
    }

    #[test]
    fn flush_fua_discard_and_write_zeroes() {
        let f = Fixture::new();
        let mut data = pattern(8192, 3);
        let mut none: [u8; 0] = [];
        let mut fua = request(sys::UBLK_IO_OP_WRITE, 0, 8192);
        fua.flags |= sys::UBLK_IO_F_FUA;
        assert_eq!(call(f.ctx(), fua, &mut data), 8192);
        assert_eq!(f.req(sys::UBLK_IO_OP_FLUSH, 0, 0, &mut none), 0);
        assert_eq!(f.req(sys::UBLK_IO_OP_DISCARD, 0, 4096, &mut none), 0);
        assert_eq!(
            f.req(sys::UBLK_IO_OP_WRITE_ZEROES, 4096, 4096, &mut none),
            0
        );
        let mut buf = vec![0xAAu8; 8192];
        assert_eq!(f.req(sys::UBLK_IO_OP_READ, 0, 8192, &mut buf), 8192);
        assert!(buf.iter().all(|&b| b == 0));
        // A worker's error reaches the request: a discard out of range.
        assert_eq!(
            f.req(sys::UBLK_IO_OP_DISCARD, 1 << 20, 4096, &mut none),
            -libc::EINVAL
        );
        // Eventfds are reused from request to request.
        for _ in 0..5 {
            assert_eq!(f.req(sys::UBLK_IO_OP_FLUSH, 0, 0, &mut none), 0);
        }
    }

    #[test]
    fn errors_become_negative_errno() {
        let f = Fixture::new();
        let mut buf = vec![0u8; 4096];
        let refused = [
            (
                sys::UBLK_IO_OP_READ,
                1 << 20,
                4096,
                -libc::EINVAL,
                "read past the end",
            ),
            (
                sys::UBLK_IO_OP_WRITE,
                512,
                4096,
                -libc::EINVAL,
                "misaligned write",
            ),
            (
                sys::UBLK_IO_OP_WRITE_SAME,
                0,
                4096,
                -libc::EOPNOTSUPP,
                "unknown op",
            ),
            // A request longer than the buffer is refused, not overrun.
            (
                sys::UBLK_IO_OP_READ,
                0,
                8192,
                -libc::EINVAL,
                "read over the buffer",
            ),
            (
                sys::UBLK_IO_OP_WRITE,
                0,
                8192,
                -libc::EINVAL,
                "write over the buffer",
            ),
        ];
        for (op, offset, len, want, what) in refused {
            assert_eq!(f.req(op, offset, len, &mut buf), want, "{what}");
        }
        // The device keeps serving.
        assert_eq!(f.req(sys::UBLK_IO_OP_READ, 0, 4096, &mut buf), 4096);
    }

    #[test]
    fn stray_completions_are_ignored() {
        let f = Fixture::new();
        let mut buf = vec![0u8; 4096];
        let table = TagTable::new(f.ctx(), [copy_buf(&mut buf)]);
        let fin = Results::default();
        // An idle tag, a tag out of range, a request for a tag out of range.
        table.complete(op_data(0, 0), 4096, &fin);
        table.complete(op_data(7, 0), 4096, &fin);
        table.start(9, request(sys::UBLK_IO_OP_READ, 0, 4096), &fin);
        assert!(fin.0.borrow().is_empty());
        assert_eq!(table.busy(), 0);
    }
}
