//! Read planning: which layer file (or zeros) each part of a read comes from.
//! The plan is computed under short read locks on the maps; the caller does the data I/O
//! on its own, outside any lock (on a queue's io_uring, or with pread).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use smallvec::SmallVec;

use super::layer::Layer;
use super::stack::{Stack, UNRESOLVED, ZERO};

/// Where the bytes of one part of a read come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    /// The part reads as zeros.
    Zero,
    /// Read `len` bytes of `fd` at `offset` (a block's slot, or its own offset in an
    /// identity layer).
    File { fd: RawFd, offset: u64 },
}

/// One contiguous part of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSegment {
    /// Offset of the part within the request's buffer.
    pub buf_offset: u64,
    pub len: u64,
    pub source: ReadSource,
}

/// The parts of a read, in order. Holds the layers it names so their files stay open
/// (and valid) until the plan is dropped, even if a merge replaces them meanwhile.
pub struct ReadPlan {
    /// Inline up to four parts: the common plans cost no allocation on the I/O path.
    pub segments: SmallVec<[ReadSegment; 4]>,
    _layers: Stack,
}

impl ReadPlan {
    /// How many layers the plan looked through (the depth of the stack it read).
    pub fn layer_count(&self) -> usize {
        self._layers.len()
    }
}

/// Plans the read of blocks `[start, end)` through `layers` (bottom first): each block
/// comes from the topmost layer that holds it, or is zero.
pub(crate) fn plan(layers: Stack, start: u32, end: u64, block_size: u32) -> ReadPlan {
    let n = (end - u64::from(start)) as usize;
    let bs = u64::from(block_size);
    let mut segments = SmallVec::new();
    if n == 1 {
        let owner = layers.owner_of_block(start);
        push_segments(&mut segments, &layers, owner, 0, 1, start, bs);
    } else if n > 1 {
        let owners = layers.owners(start, end);
        let mut run_start = 0usize;
        for i in 1..=n {
            if i == n || owners[i] != owners[run_start] {
                push_segments(
                    &mut segments,
                    &layers,
                    owners[run_start],
                    run_start,
                    i - run_start,
                    start,
                    bs,
                );
                run_start = i;
            }
        }
    }
    ReadPlan {
        segments,
        _layers: layers,
    }
}

/// Appends the parts of `count` blocks owned by `owner`, from block `start + first`: one
/// for zeros or an identity layer, one per run of consecutive slots in a slotted layer.
fn push_segments(
    out: &mut SmallVec<[ReadSegment; 4]>,
    layers: &[Arc<Layer>],
    owner: u32,
    first: usize,
    count: usize,
    start: u32,
    bs: u64,
) {
    let zero = |from: u64, blocks: u64| ReadSegment {
        buf_offset: from * bs,
        len: blocks * bs,
        source: ReadSource::Zero,
    };
    let layer = match owner {
        UNRESOLVED | ZERO => {
            out.push(zero(first as u64, count as u64));
            return;
        }
        idx => &layers[idx as usize],
    };
    let block0 = start + first as u32;
    let mut runs = SmallVec::new();
    layer.read_runs(block0, count as u32, &mut runs);
    let fd = layer.data.as_raw_fd();
    // Blocks a run does not cover (a slot missing, which open refuses) read as zeros.
    let mut at = first as u64;
    for p in runs {
        let from = first as u64 + u64::from(p.block - block0);
        if from > at {
            out.push(zero(at, from - at));
        }
        out.push(ReadSegment {
            buf_offset: from * bs,
            len: u64::from(p.count) * bs,
            source: ReadSource::File {
                fd,
                offset: u64::from(p.file_block) * bs,
            },
        });
        at = from + u64::from(p.count);
    }
    if at < (first + count) as u64 {
        out.push(zero(at, (first + count) as u64 - at));
    }
}
