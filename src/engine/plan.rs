//! Read planning: which layer file (or zeros) each part of a read comes from.
//! The plan is computed under short read locks on the maps; the caller does the data I/O
//! on its own, outside any lock (on a queue's io_uring, or with pread).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use smallvec::SmallVec;

use super::layer::Layer;

/// Where the bytes of one part of a read come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    /// The part reads as zeros.
    Zero,
    /// Read `len` bytes of `fd` at `offset` (layer files use the device's offsets).
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
    _layers: Arc<[Arc<Layer>]>,
}

impl ReadPlan {
    /// How many layers the plan looked through (the depth of the stack it read).
    pub fn layer_count(&self) -> usize {
        self._layers.len()
    }
}

const UNRESOLVED: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;

/// Plans the read of blocks `[start, end)` through `layers` (bottom first): each block
/// comes from the topmost layer that holds it, or is zero.
pub fn plan(layers: Arc<[Arc<Layer>]>, start: u32, end: u64, block_size: u32) -> ReadPlan {
    let n = (end - u64::from(start)) as usize;
    let bs = u64::from(block_size);
    let mut segments = SmallVec::new();
    if n == 1 {
        let owner = owner_of_block(&layers, start);
        segments.push(segment(&layers, owner, 0, 1, start, bs));
    } else if n > 1 {
        let owners = owners(&layers, start, end);
        let mut run_start = 0usize;
        for i in 1..=n {
            if i == n || owners[i] != owners[run_start] {
                segments.push(segment(
                    &layers,
                    owners[run_start],
                    run_start,
                    i - run_start,
                    start,
                    bs,
                ));
                run_start = i;
            }
        }
    }
    ReadPlan {
        segments,
        _layers: layers,
    }
}

fn segment(
    layers: &[Arc<Layer>],
    owner: u32,
    first: usize,
    count: usize,
    start: u32,
    bs: u64,
) -> ReadSegment {
    let buf_offset = first as u64 * bs;
    let source = match owner {
        UNRESOLVED | ZERO => ReadSource::Zero,
        idx => ReadSource::File {
            fd: layers[idx as usize].data.as_raw_fd(),
            offset: (u64::from(start) + first as u64) * bs,
        },
    };
    ReadSegment {
        buf_offset,
        len: count as u64 * bs,
        source,
    }
}

/// The owner of one block: the fast path for the most common request, a single block.
fn owner_of_block(layers: &[Arc<Layer>], block: u32) -> u32 {
    for (idx, layer) in layers.iter().enumerate().rev() {
        let st = layer.state.read();
        if st.map.present.contains(block) {
            return idx as u32;
        }
        if st.map.zeroed.contains(block) {
            return ZERO;
        }
    }
    ZERO
}

/// The owner of every block of `[start, end)`, found with range scans of each map from
/// the top down, stopping as soon as every block is decided.
fn owners(layers: &[Arc<Layer>], start: u32, end: u64) -> SmallVec<[u32; 32]> {
    let n = (end - u64::from(start)) as usize;
    // Inline up to 32 blocks (128 KiB at 4 KiB blocks): no allocation for most requests.
    let mut owner: SmallVec<[u32; 32]> = smallvec::smallvec![UNRESOLVED; n];
    let mut left = n;
    let range = start..=((end - 1) as u32);
    for (idx, layer) in layers.iter().enumerate().rev() {
        let st = layer.state.read();
        for (bm, who) in [(&st.map.present, idx as u32), (&st.map.zeroed, ZERO)] {
            for b in bm.range(range.clone()) {
                let slot = &mut owner[(b - start) as usize];
                if *slot == UNRESOLVED {
                    *slot = who;
                    left -= 1;
                }
            }
        }
        if left == 0 {
            break;
        }
    }
    owner
}
