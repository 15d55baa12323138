//! The layers of a volume as a read sees them, with an index of the sealed ones, so that
//! finding a block's owner costs about the same under one snapshot or a thousand.
//!
//! A read takes each block from the topmost layer whose map names it. Walking the maps
//! from the top costs one bitmap probe per layer: with hundreds of snapshots most reads
//! (of blocks last written before the first one) walk the whole stack. Sealed layers never
//! change their maps, so their answer can be computed once, when a layer is sealed, and
//! kept as a handful of bitmaps (see [`SealedIndex`]): a lookup then probes the layers
//! above the index one by one (the head, and a layer whose cut is still settling), then
//! `2 + log2(depth)` bitmaps of the index, whatever the depth.
//!
//! The index lives only in memory and is derived from the maps: nothing on disk changes
//! and a crash loses nothing (the next open rebuilds it).

use std::ops::{Deref, RangeInclusive};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use roaring::RoaringBitmap;
use smallvec::SmallVec;

use super::layer::Layer;
use super::layermap::LayerMap;

/// Owner of a block that is not decided by any layer (it reads as zeros).
pub(crate) const UNRESOLVED: u32 = u32::MAX;
/// Owner of a block that a layer zeroed (it reads as zeros).
pub(crate) const ZERO: u32 = u32::MAX - 1;

/// The layers of a volume or snapshot, bottom first (for a volume the last one is the
/// writable head), and the index of their sealed bottom part. Cheap to clone; a plan
/// holds one so the layer files stay open while it is read.
#[derive(Clone)]
pub(crate) struct Stack {
    layers: Arc<[Arc<Layer>]>,
    index: Arc<SealedIndex>,
}

impl Deref for Stack {
    type Target = [Arc<Layer>];

    fn deref(&self) -> &[Arc<Layer>] {
        &self.layers
    }
}

impl Stack {
    /// A stack of `layers`, its index built over the longest sealed bottom run.
    pub fn new(layers: Vec<Arc<Layer>>) -> Stack {
        let index = SealedIndex::default().extended(&layers).unwrap_or_default();
        Stack {
            layers: layers.into(),
            index: Arc::new(index),
        }
    }

    /// A new stack of `layers` that keeps this one's index where it still applies (its
    /// layers are the bottom of `layers`) and extends it over layers sealed since: a cut
    /// or a sealing commit costs the maps of the new layers only. A stack whose bottom
    /// changed (a merge) gets a fresh index.
    pub fn with_layers(&self, layers: Vec<Arc<Layer>>) -> Stack {
        let depth = self.index.depth;
        let keeps = depth <= layers.len()
            && self.layers[..depth]
                .iter()
                .zip(&layers[..depth])
                .all(|(a, b)| Arc::ptr_eq(a, b));
        let index = if keeps {
            match self.index.extended(&layers) {
                Some(grown) => Arc::new(grown),
                None => self.index.clone(),
            }
        } else {
            Arc::new(SealedIndex::default().extended(&layers).unwrap_or_default())
        };
        Stack {
            layers: layers.into(),
            index,
        }
    }

    /// The bottom `len` layers as a stack of their own (a snapshot's view).
    pub fn prefix(&self, len: usize) -> Stack {
        let layers = self.layers[..len].to_vec();
        if self.index.depth <= len {
            self.with_layers(layers)
        } else {
            Stack::new(layers)
        }
    }

    /// This stack again, with its index extended over layers sealed since it was made;
    /// None when nothing new is sealed.
    pub fn settled(&self) -> Option<Stack> {
        let grown = self.index.extended(&self.layers)?;
        Some(Stack {
            layers: self.layers.clone(),
            index: Arc::new(grown),
        })
    }

    /// How many bottom layers the index answers for (the rest are probed one by one).
    #[cfg(test)]
    pub fn indexed(&self) -> usize {
        self.index.depth
    }

    /// The owner of one block: a stack position, [`ZERO`] or [`UNRESOLVED`].
    pub fn owner_of_block(&self, block: u32) -> u32 {
        for idx in (self.index.depth..self.layers.len()).rev() {
            let st = self.layers[idx].state.read();
            if st.map.present.contains(block) {
                return idx as u32;
            }
            if st.map.zeroed.contains(block) {
                return ZERO;
            }
        }
        self.index.owner(block)
    }

    /// The owner of every block of `[start, end)` (see [`Stack::owner_of_block`]).
    pub fn owners(&self, start: u32, end: u64) -> SmallVec<[u32; 32]> {
        let n = (end - u64::from(start)) as usize;
        // Inline up to 32 blocks (128 KiB at 4 KiB blocks): no allocation for most requests.
        let mut owner: SmallVec<[u32; 32]> = smallvec::smallvec![UNRESOLVED; n];
        let mut left = n;
        let range = start..=((end - 1) as u32);
        for idx in (self.index.depth..self.layers.len()).rev() {
            let st = self.layers[idx].state.read();
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
                return owner;
            }
        }
        self.index.fill(range, &mut owner);
        owner
    }
}

/// What the sealed layers `[0, depth)` of a stack say about each block, precomputed:
/// `decided` holds the blocks some layer names, `zero` those whose topmost naming layer
/// zeroed them, and bit `j` of the owning layer's stack position is set for a block in
/// `bits[j]`. Only sealed layers are indexed: their maps never change again (a merge
/// makes new layers, and with them a new index).
///
/// Memory: `decided` is about the size of the union of the maps; a block written after
/// the first snapshot appears in as many `bits` as its owner's position has ones, so the
/// index grows with the data written, not with the number of snapshots.
#[derive(Clone, Default)]
struct SealedIndex {
    depth: usize,
    decided: RoaringBitmap,
    zero: RoaringBitmap,
    bits: Vec<RoaringBitmap>,
}

impl SealedIndex {
    /// This index grown over the sealed layers of `layers` right above it, or None when
    /// the next layer is not sealed (or there is none).
    fn extended(&self, layers: &[Arc<Layer>]) -> Option<SealedIndex> {
        let mut grown: Option<SealedIndex> = None;
        for layer in &layers[self.depth.min(layers.len())..] {
            if !layer.sealed.load(Ordering::SeqCst) {
                break;
            }
            let st = layer.state.read();
            grown.get_or_insert_with(|| self.clone()).push(&st.map);
        }
        grown
    }

    /// Puts `map` on top: its blocks now belong to stack position `depth`.
    fn push(&mut self, map: &LayerMap) {
        let position = self.depth as u64;
        while position >> self.bits.len() != 0 {
            self.bits.push(RoaringBitmap::new());
        }
        let cover = map.cover();
        self.decided |= &cover;
        self.zero -= &cover;
        self.zero |= &map.zeroed;
        for (j, plane) in self.bits.iter_mut().enumerate() {
            *plane -= &cover;
            if position >> j & 1 == 1 {
                *plane |= &map.present;
            }
        }
        self.depth += 1;
    }

    /// The owner of `block` among the indexed layers.
    fn owner(&self, block: u32) -> u32 {
        if !self.decided.contains(block) {
            return UNRESOLVED;
        }
        if self.zero.contains(block) {
            return ZERO;
        }
        self.bits
            .iter()
            .enumerate()
            .filter(|(_, plane)| plane.contains(block))
            .fold(0, |acc, (j, _)| acc | 1 << j)
    }

    /// Sets the owner of every still unresolved block of `range` (`owner[i]` is block
    /// `range.start() + i`).
    fn fill(&self, range: RangeInclusive<u32>, owner: &mut [u32]) {
        let start = *range.start();
        // The blocks this index answers for: those still unresolved that it decides.
        let mut mine: SmallVec<[bool; 32]> = smallvec::smallvec![false; owner.len()];
        for b in self.decided.range(range.clone()) {
            let i = (b - start) as usize;
            if owner[i] == UNRESOLVED {
                owner[i] = 0;
                mine[i] = true;
            }
        }
        for (j, plane) in self.bits.iter().enumerate() {
            for b in plane.range(range.clone()) {
                let i = (b - start) as usize;
                if mine[i] {
                    owner[i] |= 1 << j;
                }
            }
        }
        for b in self.zero.range(range) {
            let i = (b - start) as usize;
            if mine[i] {
                owner[i] = ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The owner of `block` found the slow way: every map from the top.
    fn walk(layers: &[Arc<Layer>], block: u32) -> u32 {
        for (idx, l) in layers.iter().enumerate().rev() {
            let st = l.state.read();
            if st.map.present.contains(block) {
                return idx as u32;
            }
            if st.map.zeroed.contains(block) {
                return ZERO;
            }
        }
        UNRESOLVED
    }

    const BLOCKS: u32 = 96;

    /// Layers with the given maps (ops: (first block, blocks, zeroed?) in order), the
    /// bottom `sealed` of them sealed.
    fn layers(
        dir: &std::path::Path,
        maps: &[Vec<(u32, u32, bool)>],
        sealed: usize,
    ) -> Vec<Arc<Layer>> {
        maps.iter()
            .enumerate()
            .map(|(i, ops)| {
                let l =
                    Layer::create_merge_target(dir, i as u64 + 1, u64::from(BLOCKS) * 4096, false)
                        .expect("layer");
                {
                    let mut st = l.state.write();
                    for &(first, len, zero) in ops {
                        let end = u64::from(first) + u64::from(len);
                        if zero {
                            st.map.mark_zeroed(first, end);
                        } else {
                            st.map.mark_written(first, end);
                        }
                    }
                }
                l.sealed.store(i < sealed, Ordering::SeqCst);
                Arc::new(l)
            })
            .collect()
    }

    fn check(stack: &Stack) {
        for b in 0..BLOCKS {
            assert_eq!(stack.owner_of_block(b), walk(stack, b), "block {b}");
        }
        for start in (0..BLOCKS).step_by(7) {
            for len in [1u32, 2, 5, 32, 40] {
                let end = (start + len).min(BLOCKS);
                let got = stack.owners(start, u64::from(end));
                let want: Vec<u32> = (start..end).map(|b| walk(stack, b)).collect();
                assert_eq!(got.as_slice(), want.as_slice(), "blocks {start}..{end}");
            }
        }
    }

    fn ops() -> impl Strategy<Value = Vec<(u32, u32, bool)>> {
        prop::collection::vec((0..BLOCKS, 1..12u32, prop::bool::weighted(0.2)), 0..6).prop_map(
            |v| {
                v.into_iter()
                    .map(|(f, l, z)| (f, l.min(BLOCKS - f), z))
                    .collect()
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Built at once, grown cut by cut, or rebuilt after a merge, the index answers
        /// exactly what walking the maps answers.
        #[test]
        fn the_index_answers_as_walking_the_maps(
            maps in prop::collection::vec(ops(), 1..40),
            unsealed in 0..3usize,
            merge_at in any::<prop::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir(dir.path().join(super::super::layer::LAYERS_DIR)).expect("layers folder");
            let n = maps.len();
            let sealed = n.saturating_sub(unsealed.max(1));
            let all = layers(dir.path(), &maps, sealed);
            let whole = Stack::new(all.clone());
            prop_assert_eq!(whole.indexed(), sealed);
            check(&whole);

            // Cut by cut: push a layer, then settle once the one below is sealed.
            let mut grown = Stack::new(all[..1].to_vec());
            for i in 2..=n {
                grown = grown.with_layers(all[..i].to_vec());
                if let Some(s) = grown.settled() {
                    grown = s;
                }
                check(&grown);
            }
            prop_assert_eq!(grown.indexed(), sealed);

            // A snapshot's view: a prefix of the stack.
            let cut = merge_at.index(n) + 1;
            check(&whole.prefix(cut));

            // A merge: two layers replaced by one holding their union.
            if sealed >= 2 {
                let at = merge_at.index(sealed - 1);
                let merged = Layer::create_merge_target(dir.path(), 1000, u64::from(BLOCKS) * 4096, false)
                    .expect("layer");
                {
                    let lower = all[at].state.read();
                    let upper = all[at + 1].state.read();
                    merged.state.write().map = upper.map.over(&lower.map);
                }
                let mut v = all.clone();
                v.splice(at..at + 2, [Arc::new(merged)]);
                let after = whole.with_layers(v);
                prop_assert_eq!(after.indexed(), sealed - 1);
                check(&after);
            }
        }
    }

    #[test]
    fn a_thousand_layers_need_ten_bit_planes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join(super::super::layer::LAYERS_DIR))
            .expect("layers folder");
        let maps: Vec<Vec<(u32, u32, bool)>> = (0..1000u32)
            .map(|i| vec![(i % BLOCKS, 1, i % 97 == 0)])
            .collect();
        let all = layers(dir.path(), &maps, 999);
        let stack = Stack::new(all);
        assert_eq!(stack.indexed(), 999);
        assert_eq!(stack.index.bits.len(), 10);
        check(&stack);
    }
}
