//! Slotted layers: where each block of a layer lives in its data file.
//!
//! A head that stored block `b` at offset `b * block_size` (the identity layout) made the
//! file system allocate space on every first write of a block after a snapshot: in a VM
//! on ext4 that ran at a seventh of an overwrite's speed. A slotted layer stores block
//! `b` in a *slot* of its file instead: the head hands out slots from space written ahead
//! of need (zeros, by a background preparer), so a first write is an overwrite for the
//! file system. The [`SlotTable`] maps blocks to slots; it is journalled with the layer's
//! map (see `maplog`) and recorded in the volatile journal with every write.
//!
//! Rules that keep this crash safe:
//! - a slot, once given to a block, stays that block's for the life of the layer (a
//!   discard punches it but keeps the placement), so no slot is ever shared by two
//!   blocks, whatever is or is not durable;
//! - a slot is given out only from space no durable or in-memory placement names
//!   (the frontier, the preparer's finished chunks, or slots found unnamed at open);
//! - the preparer writes zeros only into slots it claimed past the frontier, and the
//!   allocator never hands out a claimed slot.

use std::collections::BTreeMap;
use std::io;

/// Blocks per chunk of the table (the unit of its memory).
const CHUNK_BITS: u32 = 10;
const CHUNK_LEN: usize = 1 << CHUNK_BITS;
/// A chunk's sparse form (8 bytes an entry) turns dense (4 bytes a block) past this.
const SPARSE_MAX: usize = 256;
/// No slot (dense chunks).
const NONE: u32 = u32::MAX;

#[derive(Clone, Debug, PartialEq)]
enum Chunk {
    /// Sorted by block offset within the chunk.
    Sparse(Vec<(u16, u32)>),
    Dense(Box<[u32]>),
}

/// A block-to-slot map. Memory: 8 bytes per placed block while a 1024-block chunk holds
/// few of them, 4 KiB per chunk (4 bytes per block) once it holds more than 256. A sealed
/// layer's table never changes, and a volume keeps a thousand of them: [`SlotTable::freeze`]
/// turns it into sorted lists: single blocks as `(block, slot)`, 8 bytes each, and runs of
/// more than one block as `(block, slot, count)`, 12 bytes each (one per sequential
/// write), where the chunks of scattered writes cost about 40 bytes a block.
#[derive(Clone, Debug, Default)]
pub struct SlotTable {
    chunks: BTreeMap<u32, Chunk>,
    /// Once frozen (`chunks` is empty then), the maximal runs of more than one block, in
    /// block order; a change thaws them back into chunks.
    frozen_runs: Box<[SlotRun]>,
    /// Once frozen, the runs of one block as `(block, slot)`, in block order.
    frozen_singles: Box<[(u32, u32)]>,
    placed: u64,
    /// One past the highest slot named.
    end: u64,
}

impl PartialEq for SlotTable {
    /// Two tables are equal when they place the same blocks in the same slots, frozen or not.
    fn eq(&self, other: &SlotTable) -> bool {
        self.placed == other.placed && self.end == other.end && self.runs() == other.runs()
    }
}

/// A run of consecutive blocks stored in consecutive slots: `(block, slot, count)`.
pub type SlotRun = (u32, u32, u32);

impl SlotTable {
    /// The slot of `block`, if it has one.
    pub fn get(&self, block: u32) -> Option<u32> {
        if self.is_frozen() {
            return frozen_get(&self.frozen_runs, &self.frozen_singles, block);
        }
        let off = (block as usize) & (CHUNK_LEN - 1);
        match self.chunks.get(&(block >> CHUNK_BITS))? {
            Chunk::Sparse(v) => v
                .binary_search_by_key(&(off as u16), |e| e.0)
                .ok()
                .map(|i| v[i].1),
            Chunk::Dense(d) => Some(d[off]).filter(|&s| s != NONE),
        }
    }

    /// Gives `block` the slot `slot` (replacing any it had: only replays and merges do).
    pub fn set(&mut self, block: u32, slot: u32) {
        if self.is_frozen() {
            self.thaw();
        }
        let off = (block as usize) & (CHUNK_LEN - 1);
        let chunk = self
            .chunks
            .entry(block >> CHUNK_BITS)
            .or_insert_with(|| Chunk::Sparse(Vec::new()));
        let added = match chunk {
            Chunk::Sparse(v) => match v.binary_search_by_key(&(off as u16), |e| e.0) {
                Ok(i) => {
                    v[i].1 = slot;
                    false
                }
                Err(i) => {
                    v.insert(i, (off as u16, slot));
                    if v.len() > SPARSE_MAX {
                        let mut d = vec![NONE; CHUNK_LEN].into_boxed_slice();
                        for &(o, s) in v.iter() {
                            d[o as usize] = s;
                        }
                        *chunk = Chunk::Dense(d);
                    }
                    true
                }
            },
            Chunk::Dense(d) => {
                let added = d[off] == NONE;
                d[off] = slot;
                added
            }
        };
        if added {
            self.placed += 1;
        }
        self.end = self.end.max(u64::from(slot) + 1);
    }

    /// Places the run `(block, slot, count)`.
    pub fn set_run(&mut self, (block, slot, count): SlotRun) {
        for i in 0..count {
            self.set(block + i, slot + i);
        }
    }

    /// Blocks that have a slot.
    pub fn len(&self) -> u64 {
        self.placed
    }

    /// One past the highest slot named (0 when empty): the file must be this long.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Turns the table into its compact, read-only form (see [`SlotTable`]): for layers
    /// that take no more writes. Lookups stay correct; a later change thaws it.
    pub fn freeze(&mut self) {
        if !self.chunks.is_empty() {
            *self = self.frozen_copy();
        }
    }

    /// A compact copy of this table (see [`SlotTable::freeze`]).
    pub fn frozen_copy(&self) -> SlotTable {
        // A table with no placement has no runs: its compact form is the empty table.
        let (mut runs, mut singles) = (Vec::new(), Vec::new());
        for r in self.runs() {
            match r {
                (b, s, 1) => singles.push((b, s)),
                r => runs.push(r),
            }
        }
        SlotTable {
            chunks: BTreeMap::new(),
            frozen_runs: runs.into(),
            frozen_singles: singles.into(),
            placed: self.placed,
            end: self.end,
        }
    }

    /// True when the table is in its compact form.
    pub fn is_frozen(&self) -> bool {
        !self.frozen_runs.is_empty() || !self.frozen_singles.is_empty()
    }

    /// Moves a frozen table's runs back into chunks, to change them.
    fn thaw(&mut self) {
        let runs = std::mem::take(&mut self.frozen_runs);
        let singles = std::mem::take(&mut self.frozen_singles);
        self.placed = 0;
        for &r in runs.iter() {
            self.set_run(r);
        }
        for &(b, s) in singles.iter() {
            self.set(b, s);
        }
    }

    /// Every placement, as maximal runs in block order.
    pub fn runs(&self) -> Vec<SlotRun> {
        if self.is_frozen() {
            // Both lists are in block order and never overlap: merge them.
            let mut out = Vec::with_capacity(self.frozen_runs.len() + self.frozen_singles.len());
            let mut runs = self.frozen_runs.iter().peekable();
            for &(b, s) in self.frozen_singles.iter() {
                while let Some(&&r) = runs.peek().filter(|r| r.0 < b) {
                    out.push(r);
                    runs.next();
                }
                out.push((b, s, 1));
            }
            out.extend(runs);
            return out;
        }
        let mut out: Vec<SlotRun> = Vec::new();
        let mut push = |b: u32, s: u32| match out.last_mut() {
            Some((rb, rs, n)) if *rb + *n == b && *rs + *n == s => *n += 1,
            _ => out.push((b, s, 1)),
        };
        for (&c, chunk) in &self.chunks {
            let base = c << CHUNK_BITS;
            match chunk {
                Chunk::Sparse(v) => v.iter().for_each(|&(o, s)| push(base + u32::from(o), s)),
                Chunk::Dense(d) => d
                    .iter()
                    .enumerate()
                    .filter(|(_, &s)| s != NONE)
                    .for_each(|(o, &s)| push(base + o as u32, s)),
            }
        }
        out
    }

    /// The placements of the blocks of `blocks` that have one, as maximal runs.
    pub fn runs_of(&self, blocks: &roaring::RoaringBitmap) -> Vec<SlotRun> {
        let mut out: Vec<SlotRun> = Vec::new();
        for b in blocks {
            if let Some(s) = self.get(b) {
                match out.last_mut() {
                    Some((rb, rs, n)) if *rb + *n == b && *rs + *n == s => *n += 1,
                    _ => out.push((b, s, 1)),
                }
            }
        }
        out
    }

    /// Every slot named, as a bitmap (to find the unnamed ones).
    pub fn used(&self) -> roaring::RoaringBitmap {
        let mut bm = roaring::RoaringBitmap::new();
        for (_, s, n) in self.runs() {
            bm.insert_range(s..s + n);
        }
        bm
    }

    /// Approximate memory held, in bytes.
    pub fn memory(&self) -> usize {
        self.frozen_runs.len() * std::mem::size_of::<SlotRun>()
            + self.frozen_singles.len() * std::mem::size_of::<(u32, u32)>()
            + self
                .chunks
                .values()
                .map(|c| match c {
                    // With the vector's and the tree's own share (measured: about 60 bytes).
                    Chunk::Sparse(v) => v.capacity() * 8 + 64,
                    Chunk::Dense(_) => CHUNK_LEN * 4 + 64,
                })
                .sum::<usize>()
    }
}

/// The slot of `block` in a frozen table: `runs` and `singles` (each sorted in block
/// order, none overlapping another).
fn frozen_get(runs: &[SlotRun], singles: &[(u32, u32)], block: u32) -> Option<u32> {
    if let Ok(i) = singles.binary_search_by_key(&block, |e| e.0) {
        return Some(singles[i].1);
    }
    let i = runs.partition_point(|r| r.0 <= block);
    let &(b, s, n) = runs.get(i.checked_sub(1)?)?;
    (u64::from(block) < u64::from(b) + u64::from(n)).then(|| s + (block - b))
}

/// Serializes placement runs: a count `u64`, then `(block, slot, count)` as three `u32`s.
pub fn encode_runs(runs: &[SlotRun], out: &mut Vec<u8>) {
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for &(b, s, n) in runs {
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
    }
}

/// Reverse of [`encode_runs`]; refuses trailing bytes, empty runs, and runs that leave
/// the 32-bit block or slot space or are out of block order.
pub fn decode_runs(bytes: &[u8]) -> io::Result<Vec<SlotRun>> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if bytes.len() < 8 {
        return Err(bad("placement list shorter than its count".into()));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    let count = u64::from_le_bytes(n);
    let body = &bytes[8..];
    if count.checked_mul(12) != Some(body.len() as u64) {
        return Err(bad(format!(
            "placement list of {count} runs in {} bytes",
            body.len()
        )));
    }
    let word = |c: &[u8], i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
    let mut out = Vec::with_capacity(count as usize);
    let mut next_block = 0u64;
    for c in body.chunks_exact(12) {
        let (b, s, k) = (word(c, 0), word(c, 4), word(c, 8));
        if k == 0
            || u64::from(b) < next_block
            || u64::from(b) + u64::from(k) > 1 << 32
            || u64::from(s) + u64::from(k) > 1 << 32
        {
            return Err(bad(format!(
                "bad placement run: blocks {b}+{k} at slot {s}"
            )));
        }
        next_block = u64::from(b) + u64::from(k);
        out.push((b, s, k));
    }
    Ok(out)
}

/// Where a slotted head takes new slots from.
#[derive(Debug, Default)]
pub struct SlotAlloc {
    /// Slots at and past this were never handed out (nor named at open).
    pub next: u64,
    /// Slots below this hold written space (zeros or old data): a write there allocates
    /// nothing in the file system.
    pub prepared: u64,
    /// Slots unnamed below `next` (found at open, or prepared behind a frontier that
    /// jumped over them), as `(start, end)` ranges.
    pub free: Vec<(u64, u64)>,
    /// A chunk `[start, end)` the preparer is writing zeros to: never handed out.
    pub claim: Option<(u64, u64)>,
    /// The frontier jumped over the claim while it was written: on completion its slots
    /// go to `free`.
    pub claim_skipped: bool,
    /// The data file's length in slots, as far as this head made it (see
    /// [`SlotAlloc::extend_to`]).
    pub file_slots: u64,
}

/// The most slots a layer may have: the slot space is 32 bits, like the block space.
pub const MAX_SLOTS: u64 = 1 << 32;

impl SlotAlloc {
    /// Starts from a file of `file_slots` slots whose named slots are `used`: the
    /// frontier is past the last named slot, and the unnamed slots below it are free.
    /// What lies past it (prepared zeros, a sparse tail) is treated as unprepared.
    pub fn open(used: &roaring::RoaringBitmap, file_slots: u64) -> SlotAlloc {
        let mut free = Vec::new();
        let mut at = 0u64;
        for (s, e) in super::extent::runs(used) {
            if u64::from(s) > at {
                free.push((at, u64::from(s)));
            }
            at = e;
        }
        SlotAlloc {
            next: at,
            prepared: at,
            free,
            claim: None,
            claim_skipped: false,
            file_slots,
        }
    }

    /// When slots up to `end` lie past the file's end, the length (in slots) to give the
    /// file so that writes there are not extending writes (which file systems serialize
    /// and complete synchronously); None when the file is long enough.
    pub fn extend_to(&mut self, end: u64, step: u64) -> Option<u64> {
        if end <= self.file_slots {
            return None;
        }
        self.file_slots = (end + step).min(MAX_SLOTS);
        Some(self.file_slots)
    }

    /// Takes up to `want` consecutive slots: `(first, count)`, or None when the slot
    /// space is used up.
    pub fn take(&mut self, want: u32) -> Option<(u32, u32)> {
        let want = u64::from(want.max(1));
        if let Some(r) = self.free.first_mut() {
            let first = r.0;
            let n = want.min(r.1 - r.0);
            r.0 += n;
            if r.0 == r.1 {
                self.free.remove(0);
            }
            return Some((first as u32, n as u32));
        }
        if let Some((cs, ce)) = self.claim {
            if self.next >= cs && self.next < ce {
                // The preparer is writing this chunk: jump over it.
                self.next = ce;
                self.claim_skipped = true;
            }
        }
        let mut n = want;
        if let Some((cs, _)) = self.claim {
            if self.next < cs {
                n = n.min(cs - self.next);
            }
        }
        if self.next + n > MAX_SLOTS {
            n = MAX_SLOTS.saturating_sub(self.next);
            if n == 0 {
                return None;
            }
        }
        let first = self.next;
        self.next += n;
        Some((first as u32, n as u32))
    }

    /// Prepared slots not yet handed out (space written ahead of need).
    pub fn reserve(&self) -> u64 {
        self.prepared.saturating_sub(self.next) + self.free.iter().map(|(s, e)| e - s).sum::<u64>()
    }

    /// Claims the next chunk of up to `chunk` slots to prepare, keeping at most `target`
    /// slots prepared ahead of the frontier and the file within `limit` slots; None when
    /// enough is prepared.
    pub fn claim_next(&mut self, chunk: u64, target: u64, limit: u64) -> Option<(u64, u64)> {
        if self.claim.is_some() {
            return None;
        }
        let start = self.prepared.max(self.next);
        if self.reserve() >= target || start >= limit.min(MAX_SLOTS) {
            return None;
        }
        let end = (start + chunk).min(limit.min(MAX_SLOTS));
        self.claim = Some((start, end));
        self.claim_skipped = false;
        Some((start, end))
    }

    /// Ends the claim: its slots are prepared (or given up when `ok` is false).
    pub fn finish_claim(&mut self, ok: bool) {
        let Some((s, e)) = self.claim.take() else {
            return;
        };
        if !ok {
            return;
        }
        self.file_slots = self.file_slots.max(e);
        if self.claim_skipped {
            self.free.push((s, e));
        } else {
            self.prepared = self.prepared.max(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A frozen table answers every lookup as the table it was made from, and a change
        /// to it (a merge's) gives the same table as the change made before freezing.
        #[test]
        fn a_frozen_table_answers_as_before(
            // Single blocks and longer runs mixed, as scattered and sequential writes.
            places in proptest::collection::vec(
                (0u32..5000, 0u32..100_000, prop_oneof![Just(1u32), 2u32..40]),
                0..300,
            ),
            change in (0u32..5000, 0u32..100_000, 1u32..40),
        ) {
            let mut t = SlotTable::default();
            for &r in &places {
                t.set_run(r);
            }
            let mut f = t.clone();
            f.freeze();
            prop_assert_eq!(f.is_frozen(), t.len() > 0);
            let c = t.frozen_copy();
            for b in 0..5100u32 {
                prop_assert_eq!(f.get(b), t.get(b), "block {}", b);
                prop_assert_eq!(c.get(b), t.get(b), "block {}", b);
            }
            prop_assert_eq!(f.runs(), t.runs());
            prop_assert_eq!((f.len(), f.end()), (t.len(), t.end()));
            prop_assert_eq!(f.used(), t.used());
            let all: roaring::RoaringBitmap = (0..5100u32).collect();
            prop_assert_eq!(f.runs_of(&all), t.runs_of(&all));
            t.set_run(change);
            f.set_run(change);
            prop_assert!(!f.is_frozen());
            prop_assert_eq!(f.runs(), t.runs());
            prop_assert_eq!((f.len(), f.end()), (t.len(), t.end()));
        }
    }

    #[test]
    fn a_frozen_table_of_scattered_blocks_is_smaller() {
        // A snapshot's worth of random 4 KiB writes over a 512 MiB volume: a couple of
        // blocks in each 1024-block chunk.
        let mut t = SlotTable::default();
        for i in 0..256u32 {
            t.set(i.wrapping_mul(2_654_435_761) % 131_072, i);
        }
        let before = t.memory();
        t.freeze();
        // One single block each, 8 bytes.
        assert_eq!(t.memory(), 256 * 8);
        assert!(
            t.memory() * 2 < before,
            "{} bytes frozen, {before} before",
            t.memory()
        );
    }

    #[test]
    fn table_sparse_and_dense_agree() {
        let mut t = SlotTable::default();
        for b in (0..3000u32).step_by(3) {
            t.set(b, b / 3 + 7);
        }
        t.set(5_000_000, 1);
        assert_eq!(t.len(), 1001);
        for b in 0..3000u32 {
            assert_eq!(t.get(b), (b % 3 == 0).then_some(b / 3 + 7));
        }
        assert_eq!(t.get(5_000_000), Some(1));
        t.set(3, 99);
        assert_eq!(t.get(3), Some(99));
        assert_eq!(t.len(), 1001);
        let mut u = SlotTable::default();
        for r in t.runs() {
            u.set_run(r);
        }
        assert_eq!(u.runs(), t.runs());
        let mut buf = Vec::new();
        encode_runs(&t.runs(), &mut buf);
        assert_eq!(decode_runs(&buf).expect("round trip"), t.runs());
        assert!(decode_runs(&buf[..buf.len() - 1]).is_err());
    }

    #[test]
    fn runs_merge_consecutive_blocks_and_slots() {
        let mut t = SlotTable::default();
        t.set_run((10, 100, 5));
        t.set_run((15, 105, 2));
        t.set_run((17, 0, 1));
        assert_eq!(t.runs(), vec![(10, 100, 7), (17, 0, 1)]);
        let bm: roaring::RoaringBitmap = [11u32, 12, 16, 17, 40].into_iter().collect();
        assert_eq!(t.runs_of(&bm), vec![(11, 101, 2), (16, 106, 1), (17, 0, 1)]);
    }

    #[test]
    fn decode_refuses_bad_runs() {
        for runs in [
            vec![(0u32, 0u32, 0u32)],
            vec![(u32::MAX, 0, 2)],
            vec![(0, u32::MAX, 2)],
            vec![(10, 0, 5), (12, 9, 1)],
        ] {
            let mut buf = Vec::new();
            encode_runs(&runs, &mut buf);
            assert!(decode_runs(&buf).is_err(), "{runs:?}");
        }
    }

    #[test]
    fn alloc_never_hands_out_claimed_or_named_slots() {
        let used: roaring::RoaringBitmap = [0u32, 1, 5, 9].into_iter().collect();
        let mut a = SlotAlloc::open(&used, 12);
        assert_eq!(a.free, vec![(2, 5), (6, 9)]);
        assert_eq!((a.next, a.prepared), (10, 10), "past the last named slot");
        assert_eq!(a.take(8), Some((2, 3)));
        assert_eq!(a.take(1), Some((6, 1)));
        assert_eq!(a.take(8), Some((7, 2)));
        assert_eq!(a.take(2), Some((10, 2)));
        assert_eq!(a.take(1), Some((12, 1)));
        assert_eq!(a.extend_to(13, 100), Some(113), "past the file's end");
        assert_eq!(a.extend_to(50, 100), None);
        // The preparer claims past the frontier; the allocator stops short of it...
        assert_eq!(a.claim_next(4, 100, 1000), Some((13, 17)));
        assert_eq!(a.take(8), Some((17, 8)), "jumps over the claim");
        assert!(a.claim_skipped);
        a.finish_claim(true);
        assert_eq!(a.free, vec![(13, 17)], "a skipped claim is kept for later");
        assert_eq!(a.take(2), Some((13, 2)));
        // ...and a finished claim ahead of the frontier counts as prepared.
        let mut b = SlotAlloc::open(&roaring::RoaringBitmap::new(), 0);
        assert_eq!(b.claim_next(4, 8, 1000), Some((0, 4)));
        assert_eq!(b.take(2), Some((4, 2)), "never inside the claim");
        b.finish_claim(true);
        assert_eq!(b.free, vec![(0, 4)]);
        let mut c = SlotAlloc::open(&roaring::RoaringBitmap::new(), 0);
        assert_eq!(c.claim_next(4, 8, 1000), Some((0, 4)));
        c.finish_claim(true);
        assert_eq!((c.prepared, c.reserve()), (4, 4));
        assert_eq!(c.take(3), Some((0, 3)));
        assert_eq!(c.claim_next(4, 8, 1000), Some((4, 8)));
        assert_eq!(c.take(3), Some((3, 1)), "stops at the claim");
        c.finish_claim(true);
        assert_eq!(c.claim_next(4, 8, 6), None, "the file limit holds");
    }

    #[test]
    fn writes_of_any_size_take_prepared_slots_first() {
        let mut a = SlotAlloc::open(&roaring::RoaringBitmap::new(), 0);
        assert_eq!(a.claim_next(8, 8, 1000), Some((0, 8)));
        a.finish_claim(true);
        // A 128 KiB write: the 8 prepared slots and the next ones, in one run.
        assert_eq!(a.take(32), Some((0, 32)));
        assert_eq!(a.reserve(), 0);
        // A claim in progress is jumped over and, once written, serves from the free list.
        assert_eq!(a.claim_next(8, 8, 1000), Some((32, 40)));
        assert_eq!(a.take(32), Some((40, 32)));
        a.finish_claim(true);
        assert_eq!(a.free, vec![(32, 40)]);
        assert_eq!(a.take(32), Some((32, 8)));
    }
}
