//! One ublk request turned into engine calls and io_uring operations on the queue's
//! own ring: READ = one read per plan segment, WRITE = one write into the head layer
//! (then a flush for FUA), FLUSH / DISCARD / WRITE_ZEROES = a worker call whose result
//! comes back through an eventfd read on the same ring.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use libublk::io::with_task_io_ring_mut;
use libublk::sys;
use libublk::uring_async::UblkUringOpFuture;
use libublk::UblkUringData;
use tracing::{debug, warn};

use crate::engine::{EngineError, ReadSegment, ReadSource, SnapshotView, Volume};
use smallvec::SmallVec;

use super::features::DataMode;
use super::worker::{decode_result, BlockingOp, Completion, WorkSubmitter};

/// How many times a request retries ring ops that return EAGAIN/EINTR before failing.
const MAX_RETRIES: u32 = 16;

/// The fields of a request descriptor, copied out of the shared descriptor page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `UBLK_IO_OP_*`.
    pub op: u32,
    /// `UBLK_IO_F_*` (the whole op_flags word).
    pub flags: u32,
    /// Byte offset on the device.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

impl Request {
    /// Copies a descriptor (the kernel rewrites it for the next request of the tag).
    pub fn from_iod(iod: &sys::ublksrv_io_desc) -> Request {
        Request {
            op: iod.op_flags & 0xff,
            flags: iod.op_flags,
            offset: iod.start_sector << 9,
            len: u64::from(iod.nr_sectors) << 9,
        }
    }

    /// Whether the request asks for Force Unit Access.
    pub fn fua(&self) -> bool {
        self.flags & sys::UBLK_IO_F_FUA != 0
    }
}

/// The request's data buffer.
#[derive(Debug, Clone, Copy)]
pub enum DataBuf {
    /// Copy mode: the tag's buffer in our memory (`ptr`, `len` bytes, page aligned).
    Copy { ptr: *mut u8, len: usize },
    /// Zero-copy mode: the request's pages, auto-registered at this fixed-buffer index.
    Fixed { index: u16 },
}

/// Direction of a data transfer between the request buffer and a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// File (or zeros) into the buffer.
    Read,
    /// Buffer into the file.
    Write,
}

/// One part of a transfer: where in the request's buffer, how long, which file.
type Piece = ReadSegment;

/// The parts of one transfer, inline up to four: no allocation per request.
type Pieces = SmallVec<[Piece; 4]>;

/// What the tag tasks of one queue share to serve requests. Ring ops go to the
/// calling thread's io_uring (the queue's ring, set up by libublk).
pub struct IoCtx {
    /// The volume served.
    pub volume: Volume,
    /// Set when the device serves this snapshot of the volume, read-only.
    pub snapshot: Option<SnapshotView>,
    /// Where blocking calls go.
    pub work: WorkSubmitter,
    /// Copy or zero copy.
    pub mode: DataMode,
    /// /dev/zero, read into registered buffers for zero parts in zero-copy mode.
    pub devzero: Option<OwnedFd>,
    /// Idle eventfds for blocking calls, reused from request to request.
    completions: RefCell<Vec<Arc<Completion>>>,
}

/// A negative errno for an engine error.
fn neg_errno(e: &EngineError) -> i32 {
    -e.errno().abs().max(1)
}

/// What to do after one ring op of a transfer completed with `res`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The piece is done.
    Done,
    /// The request fails with this -errno.
    Failed(i32),
    /// Move this (rest of the) piece again: EAGAIN/EINTR, a short transfer, or the end
    /// of a layer file (the rest reads as zeros).
    Again(Piece),
}

/// Decides what follows op result `res` for piece `p`.
fn outcome(dir: Dir, p: &Piece, res: i32) -> Outcome {
    match res {
        r if r == -libc::EAGAIN || r == -libc::EINTR => Outcome::Again(*p),
        r if r < 0 => {
            warn!(?dir, source = ?p.source, len = p.len, res = r, "backing I/O failed");
            Outcome::Failed(r)
        }
        0 => match (dir, p.source) {
            (Dir::Read, ReadSource::File { .. }) => Outcome::Again(Piece {
                source: ReadSource::Zero,
                ..*p
            }),
            _ => Outcome::Failed(-libc::EIO),
        },
        r => {
            let done = u64::try_from(r).unwrap_or(0);
            if done >= p.len {
                return Outcome::Done;
            }
            Outcome::Again(Piece {
                buf_offset: p.buf_offset + done,
                len: p.len - done,
                source: match p.source {
                    ReadSource::File { fd, offset } => ReadSource::File {
                        fd,
                        offset: offset + done,
                    },
                    ReadSource::Zero => ReadSource::Zero,
                },
            })
        }
    }
}

/// Byte count as a request result (requests are at most a few MiB).
fn bytes_result(len: u64) -> i32 {
    i32::try_from(len).unwrap_or(-libc::EINVAL)
}

/// Queues `sqe` on this thread's ring (submitted at the queue loop's next wait) and
/// returns the future of its result. The caller keeps every buffer the op uses alive
/// until the future has completed.
fn submit_op(sqe: squeue::Entry) -> UblkUringOpFuture {
    let fut = UblkUringOpFuture::new(UblkUringData::Target as u64);
    let sqe = sqe.user_data(fut.user_data);
    with_task_io_ring_mut(|ring| loop {
        // SAFETY: the buffers and descriptors named by the entry outlive the op: every
        // caller awaits the returned future before releasing them.
        if unsafe { ring.submission().push(&sqe) }.is_ok() {
            break;
        }
        // Submission queue full: hand the queued entries to the kernel, then retry.
        if let Err(e) = ring.submit() {
            warn!(error = %e, "submitting to the queue ring failed; retrying");
        }
    });
    fut
}

impl IoCtx {
    /// Context for the tasks of one queue thread.
    pub fn new(
        volume: Volume,
        snapshot: Option<SnapshotView>,
        work: WorkSubmitter,
        mode: DataMode,
        devzero: Option<OwnedFd>,
    ) -> Self {
        IoCtx {
            volume,
            snapshot,
            work,
            mode,
            devzero,
            completions: RefCell::new(Vec::new()),
        }
    }

    /// Serves one request and returns its result: bytes done, 0, or -errno.
    pub async fn handle(&self, tag: u16, req: Request, buf: DataBuf) -> i32 {
        let res = match req.op {
            sys::UBLK_IO_OP_READ => self.read(req, buf).await,
            // A snapshot device is marked read-only, so the kernel refuses writes first;
            // this is the second line. It has nothing to flush.
            sys::UBLK_IO_OP_FLUSH if self.snapshot.is_some() => 0,
            sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES
                if self.snapshot.is_some() =>
            {
                -libc::EROFS
            }
            sys::UBLK_IO_OP_WRITE => self.write(req, buf).await,
            sys::UBLK_IO_OP_FLUSH => self.blocking(BlockingOp::Flush).await,
            sys::UBLK_IO_OP_DISCARD => {
                self.blocking(BlockingOp::Discard {
                    offset: req.offset,
                    len: req.len,
                })
                .await
            }
            sys::UBLK_IO_OP_WRITE_ZEROES => {
                self.blocking(BlockingOp::WriteZeroes {
                    offset: req.offset,
                    len: req.len,
                })
                .await
            }
            _ => -libc::EOPNOTSUPP,
        };
        if res < 0 {
            debug!(
                tag,
                op = req.op,
                offset = req.offset,
                len = req.len,
                res,
                "request failed"
            );
        }
        res
    }

    async fn read(&self, req: Request, buf: DataBuf) -> i32 {
        let planned = match &self.snapshot {
            Some(view) => view.plan_read(req.offset, req.len),
            None => self.volume.plan_read(req.offset, req.len),
        };
        let plan = match planned {
            Ok(p) => p,
            Err(e) => {
                warn!(offset = req.offset, len = req.len, error = %e, "read refused");
                return neg_errno(&e);
            }
        };
        let res = self.transfer(Dir::Read, buf, &plan.segments).await;
        // The plan kept the layer files open until every op on them completed.
        drop(plan);
        if res < 0 {
            res
        } else {
            bytes_result(req.len)
        }
    }

    async fn write(&self, req: Request, buf: DataBuf) -> i32 {
        let ticket = match self.volume.begin_write(req.offset, req.len) {
            Ok(t) => t,
            Err(e) => {
                warn!(offset = req.offset, len = req.len, error = %e, "write refused");
                return neg_errno(&e);
            }
        };
        let piece = Piece {
            buf_offset: 0,
            len: req.len,
            source: ReadSource::File {
                fd: ticket.fd(),
                offset: ticket.file_offset(),
            },
        };
        let res = self
            .transfer(Dir::Write, buf, std::slice::from_ref(&piece))
            .await;
        if res < 0 {
            // Dropping the ticket uncompleted leaves the map as it was.
            drop(ticket);
            return res;
        }
        ticket.complete();
        if self.volume.flush_advised() {
            self.work.flush_in_background();
        }
        if req.fua() {
            let r = self.blocking(BlockingOp::Flush).await;
            if r < 0 {
                return r;
            }
        }
        bytes_result(req.len)
    }

    /// Builds the ring op moving `p` in direction `dir`; None for a zero part in copy
    /// mode, which is filled in place.
    fn build_op(&self, dir: Dir, buf: DataBuf, p: &Piece) -> Result<Option<squeue::Entry>, i32> {
        let len = u32::try_from(p.len).map_err(|_| -libc::EINVAL)?;
        let (fd, file_off): (RawFd, u64) = match p.source {
            ReadSource::File { fd, offset } => (fd, offset),
            ReadSource::Zero => match (dir, buf, &self.devzero) {
                (Dir::Read, DataBuf::Copy { ptr, len: cap }, _) => {
                    let end = p.buf_offset.checked_add(p.len).ok_or(-libc::EINVAL)?;
                    if end > cap as u64 {
                        return Err(-libc::EINVAL);
                    }
                    // SAFETY: [buf_offset, end) lies inside the tag's live buffer (checked
                    // above), and no ring op targets that range.
                    unsafe {
                        std::ptr::write_bytes(ptr.add(p.buf_offset as usize), 0, p.len as usize)
                    };
                    return Ok(None);
                }
                (Dir::Read, DataBuf::Fixed { .. }, Some(z)) => (z.as_raw_fd(), 0),
                _ => return Err(-libc::EIO),
            },
        };
        let sqe = match (dir, buf) {
            (dir, DataBuf::Copy { ptr, len: cap }) => {
                let end = p.buf_offset.checked_add(p.len).ok_or(-libc::EINVAL)?;
                if end > cap as u64 {
                    return Err(-libc::EINVAL);
                }
                // SAFETY: in bounds of the tag's buffer (checked above); the buffer outlives
                // the op because the request awaits every op before it completes.
                let at = unsafe { ptr.add(p.buf_offset as usize) };
                match dir {
                    Dir::Read => opcode::Read::new(types::Fd(fd), at, len)
                        .offset(file_off)
                        .build(),
                    Dir::Write => opcode::Write::new(types::Fd(fd), at.cast_const(), len)
                        .offset(file_off)
                        .build(),
                }
            }
            // A registered kernel buffer is addressed from 0: the address is the offset
            // inside the request.
            (Dir::Read, DataBuf::Fixed { index }) => {
                opcode::ReadFixed::new(types::Fd(fd), p.buf_offset as *mut u8, len, index)
                    .offset(file_off)
                    .build()
            }
            (Dir::Write, DataBuf::Fixed { index }) => {
                opcode::WriteFixed::new(types::Fd(fd), p.buf_offset as *const u8, len, index)
                    .offset(file_off)
                    .build()
            }
        };
        Ok(Some(sqe))
    }

    /// Moves every piece, one ring op each, all in flight together; retries short
    /// transfers and EAGAIN. Returns 0 or the first -errno, always after every op
    /// submitted has completed (the buffer must not be reused while one is running).
    async fn transfer(&self, dir: Dir, buf: DataBuf, pieces: &[Piece]) -> i32 {
        // The common request is one piece: one op, no bookkeeping.
        if let [p] = pieces {
            let sqe = match self.build_op(dir, buf, p) {
                Ok(Some(sqe)) => sqe,
                Ok(None) => return 0,
                Err(e) => return e,
            };
            let res = submit_op(sqe).await;
            return match outcome(dir, p, res) {
                Outcome::Done => 0,
                Outcome::Failed(e) => e,
                Outcome::Again(rest) => Box::pin(self.transfer_all(dir, buf, &[rest], 1)).await,
            };
        }
        // Boxed: the general case's state stays out of every request's future, which
        // is moved and polled on the fast path.
        Box::pin(self.transfer_all(dir, buf, pieces, 0)).await
    }

    /// The general case of [`IoCtx::transfer`], `retries` already spent.
    async fn transfer_all(&self, dir: Dir, buf: DataBuf, pieces: &[Piece], retries: u32) -> i32 {
        let mut retries = retries;
        let mut first_err = 0;
        let mut pending = Pieces::from_slice(pieces);
        while !pending.is_empty() && first_err == 0 {
            if retries > MAX_RETRIES {
                return -libc::EAGAIN;
            }
            let mut inflight: SmallVec<[(Piece, UblkUringOpFuture); 4]> = SmallVec::new();
            for p in pending.drain(..) {
                match self.build_op(dir, buf, &p) {
                    Ok(Some(sqe)) => inflight.push((p, submit_op(sqe))),
                    Ok(None) => {}
                    Err(e) => {
                        first_err = e;
                        break;
                    }
                }
            }
            let mut again = false;
            for (p, fut) in inflight {
                let res = fut.await;
                if first_err != 0 {
                    continue;
                }
                match outcome(dir, &p, res) {
                    Outcome::Done => {}
                    Outcome::Failed(e) => first_err = e,
                    Outcome::Again(rest) => {
                        again = true;
                        pending.push(rest);
                    }
                }
            }
            if again {
                retries += 1;
            }
        }
        first_err
    }

    /// Runs a blocking engine call on a worker and waits for it on the ring.
    async fn blocking(&self, op: BlockingOp) -> i32 {
        let done = match self.completions.borrow_mut().pop() {
            Some(c) => c,
            None => match Completion::new() {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    warn!(error = %e, "cannot create an eventfd");
                    return -e.raw_os_error().unwrap_or(libc::ENOMEM);
                }
            },
        };
        if self.work.submit(op, done.clone()).is_err() {
            return -libc::EIO;
        }
        let mut val = [0u8; 8];
        let mut retries = 0;
        let res = loop {
            let sqe = opcode::Read::new(types::Fd(done.fd()), val.as_mut_ptr(), 8).build();
            let r = submit_op(sqe).await;
            if (r == -libc::EAGAIN || r == -libc::EINTR) && retries < MAX_RETRIES {
                retries += 1;
                continue;
            }
            break r;
        };
        if res != 8 {
            // The worker may still write to this eventfd: never reuse it.
            warn!(res, ?op, "waiting for a worker failed");
            return if res < 0 { res } else { -libc::EIO };
        }
        self.completions.borrow_mut().push(done);
        decode_result(u64::from_ne_bytes(val))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::CreateOptions;
    use crate::ublk::executor::LocalExecutor;
    use crate::ublk::worker::Workers;
    use io_uring::IoUring;
    use libublk::uring_async::ublk_wake_task;
    use std::cell::Cell;
    use std::future::Future;
    use std::rc::Rc;

    #[test]
    fn request_from_descriptor() {
        let iod = sys::ublksrv_io_desc {
            op_flags: sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA,
            nr_sectors: 16,
            start_sector: 8,
            addr: 0,
        };
        let r = Request::from_iod(&iod);
        assert_eq!(r.op, sys::UBLK_IO_OP_WRITE);
        assert!(r.fua());
        assert_eq!(r.offset, 4096);
        assert_eq!(r.len, 8192);
        let iod = sys::ublksrv_io_desc {
            op_flags: sys::UBLK_IO_OP_READ,
            nr_sectors: 1,
            start_sector: 0,
            addr: 0,
        };
        assert!(!Request::from_iod(&iod).fua());
    }

    #[test]
    fn outcomes_of_ring_results() {
        let p = Piece {
            buf_offset: 4096,
            len: 8192,
            source: ReadSource::File { fd: 3, offset: 0 },
        };
        assert_eq!(outcome(Dir::Read, &p, 8192), Outcome::Done);
        assert_eq!(outcome(Dir::Read, &p, -libc::EAGAIN), Outcome::Again(p));
        assert_eq!(
            outcome(Dir::Write, &p, -libc::EIO),
            Outcome::Failed(-libc::EIO)
        );
        assert_eq!(
            outcome(Dir::Read, &p, 4096),
            Outcome::Again(Piece {
                buf_offset: 8192,
                len: 4096,
                source: ReadSource::File {
                    fd: 3,
                    offset: 4096
                },
            })
        );
        // The end of a layer file: the rest reads as zeros; a write there is an error.
        assert_eq!(
            outcome(Dir::Read, &p, 0),
            Outcome::Again(Piece {
                source: ReadSource::Zero,
                ..p
            })
        );
        assert_eq!(outcome(Dir::Write, &p, 0), Outcome::Failed(-libc::EIO));
    }

    #[test]
    fn byte_results() {
        assert_eq!(bytes_result(4096), 4096);
        assert_eq!(bytes_result(u64::MAX), -libc::EINVAL);
    }

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

    /// Runs `fut` the way a queue thread does: wait on the ring, wake, run.
    fn run<F: Future<Output = i32>>(fut: F) -> i32 {
        let exe = LocalExecutor::new();
        let out = Rc::new(Cell::new(None));
        let o = out.clone();
        exe.spawn(async move { o.set(Some(fut.await)) });
        exe.run_ready();
        while !exe.is_done() {
            with_task_io_ring_mut(|r| r.submit_and_wait(1)).expect("wait");
            let cqes: Vec<io_uring::cqueue::Entry> =
                with_task_io_ring_mut(|r| r.completion().collect());
            for cqe in &cqes {
                ublk_wake_task(cqe.user_data(), cqe);
            }
            exe.run_ready();
        }
        out.get().expect("finished")
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        volume: Volume,
        workers: Option<Workers>,
        ctx: IoCtx,
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
            let ctx = IoCtx::new(
                volume.clone(),
                None,
                workers.submitter().expect("submitter"),
                DataMode::Copy,
                None,
            );
            Fixture {
                _tmp: tmp,
                volume,
                workers: Some(workers),
                ctx,
            }
        }

        fn req(&self, op: u32, offset: u64, len: u64, buf: &mut [u8]) -> i32 {
            call(&self.ctx, op, offset, len, buf)
        }
    }

    /// Serves one request of `op` through `ctx` with `buf` as the tag's buffer.
    fn call(ctx: &IoCtx, op: u32, offset: u64, len: u64, buf: &mut [u8]) -> i32 {
        let data = DataBuf::Copy {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        };
        let r = Request {
            op,
            flags: op,
            offset,
            len,
        };
        run(ctx.handle(0, r, data))
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
    fn snapshot_device_reads_the_snapshot_and_refuses_writes() {
        let f = Fixture::new();
        let mut old = pattern(8192, 5);
        assert_eq!(f.req(sys::UBLK_IO_OP_WRITE, 0, 8192, &mut old), 8192);
        f.volume.create_snapshot("s1").expect("snapshot");
        let mut new = pattern(4096, 77);
        assert_eq!(f.req(sys::UBLK_IO_OP_WRITE, 0, 4096, &mut new), 4096);
        let view = f.volume.snapshot_view("s1").expect("view");
        let ctx = IoCtx::new(
            f.volume.clone(),
            Some(view),
            f.ctx.work.clone(),
            DataMode::Copy,
            None,
        );
        let call =
            |op: u32, offset: u64, len: u64, buf: &mut [u8]| call(&ctx, op, offset, len, buf);
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
        let r = Request {
            op: sys::UBLK_IO_OP_WRITE,
            flags: sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA,
            offset: 0,
            len: 8192,
        };
        let buf = DataBuf::Copy {
            ptr: data.as_mut_ptr(),
            len: data.len(),
        };
        assert_eq!(run(f.ctx.handle(1, r, buf)), 8192);
        assert_eq!(f.req(sys::UBLK_IO_OP_FLUSH, 0, 0, &mut none), 0);
        assert_eq!(f.req(sys::UBLK_IO_OP_DISCARD, 0, 4096, &mut none), 0);
        assert_eq!(
            f.req(sys::UBLK_IO_OP_WRITE_ZEROES, 4096, 4096, &mut none),
            0
        );
        let mut buf = vec![0xAAu8; 8192];
        assert_eq!(f.req(sys::UBLK_IO_OP_READ, 0, 8192, &mut buf), 8192);
        assert!(buf.iter().all(|&b| b == 0));
        // The same eventfd serves many calls.
        for _ in 0..5 {
            assert_eq!(f.req(sys::UBLK_IO_OP_FLUSH, 0, 0, &mut none), 0);
        }
    }

    #[test]
    fn errors_become_negative_errno() {
        let f = Fixture::new();
        let mut buf = vec![0u8; 4096];
        let mut none: [u8; 0] = [];
        assert_eq!(
            f.req(sys::UBLK_IO_OP_READ, 1 << 20, 4096, &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            f.req(sys::UBLK_IO_OP_WRITE, 512, 4096, &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            f.req(sys::UBLK_IO_OP_DISCARD, 1 << 20, 4096, &mut none),
            -libc::EINVAL
        );
        assert_eq!(
            f.req(sys::UBLK_IO_OP_WRITE_SAME, 0, 4096, &mut buf),
            -libc::EOPNOTSUPP
        );
        // A request longer than the buffer is refused, not overrun.
        assert_eq!(
            f.req(sys::UBLK_IO_OP_READ, 0, 8192, &mut buf),
            -libc::EINVAL
        );
        // The device keeps serving.
        assert_eq!(f.req(sys::UBLK_IO_OP_READ, 0, 4096, &mut buf), 4096);
    }
}
