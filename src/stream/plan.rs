//! What an export sends: the snapshot's extents sorted into data to copy and ranges to
//! zero, computed from the engine's extent lists before any data is read, so the header
//! can announce the totals and the import can show progress.

use crate::engine::Extent;

use super::format::{Totals, MAX_DATA_LEN};

/// One part of the export, in volume byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Copy the snapshot's data of this extent (sent in records of at most
    /// [`MAX_DATA_LEN`] bytes).
    Data(Extent),
    /// This extent reads as zeros in the snapshot but may hold older data in the base:
    /// the import must zero it.
    Zero(Extent),
}

/// The pieces of an export, sorted by offset, and what they add up to. Borrows the
/// engine's extent lists and yields the pieces lazily, so planning adds no memory of its
/// own however fragmented the snapshot is.
#[derive(Debug, Clone, Copy)]
pub struct ExportPlan<'a> {
    /// For an incremental: the extents changed since the base.
    changed: Option<&'a [Extent]>,
    /// The snapshot's allocated extents.
    allocated: &'a [Extent],
    totals: Totals,
}

impl<'a> ExportPlan<'a> {
    /// A full stream: every allocated extent of the snapshot, as data.
    pub fn full(allocated: &'a [Extent]) -> ExportPlan<'a> {
        ExportPlan::new(None, allocated)
    }

    /// An incremental stream: the extents changed since the base; the parts of them that
    /// the snapshot holds data for are sent as data, the rest (discarded, zeroed) as zero
    /// extents so the import hides the older data. Both lists must be sorted and merged,
    /// as the engine returns them.
    pub fn incremental(changed: &'a [Extent], allocated: &'a [Extent]) -> ExportPlan<'a> {
        ExportPlan::new(Some(changed), allocated)
    }

    fn new(changed: Option<&'a [Extent]>, allocated: &'a [Extent]) -> ExportPlan<'a> {
        let mut plan = ExportPlan {
            changed,
            allocated,
            totals: Totals::default(),
        };
        let mut t = Totals::default();
        for p in plan.pieces() {
            match p {
                Piece::Data(e) => {
                    t.records += e.length.div_ceil(MAX_DATA_LEN);
                    t.data_bytes += e.length;
                }
                Piece::Zero(e) => {
                    t.records += 1;
                    t.zero_bytes += e.length;
                }
            }
        }
        plan.totals = t;
        plan
    }

    /// The pieces, sorted by offset.
    pub fn pieces(&self) -> Pieces<'a> {
        Pieces {
            changed: self.changed,
            allocated: self.allocated,
            c: 0,
            a: 0,
            pos: 0,
        }
    }

    /// Records, data bytes and zero bytes the stream will hold.
    pub fn totals(&self) -> Totals {
        self.totals
    }
}

/// Iterator returned by [`ExportPlan::pieces`]: a merge of the two sorted lists.
#[derive(Debug, Clone)]
pub struct Pieces<'a> {
    changed: Option<&'a [Extent]>,
    allocated: &'a [Extent],
    /// Next changed extent (incremental) or allocated extent (full).
    c: usize,
    /// First allocated extent that may still overlap `pos` (incremental).
    a: usize,
    /// Volume offset up to which pieces were yielded.
    pos: u64,
}

impl Iterator for Pieces<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        let Some(changed) = self.changed else {
            while let Some(e) = self.allocated.get(self.c) {
                self.c += 1;
                if e.length > 0 {
                    return Some(Piece::Data(*e));
                }
            }
            return None;
        };
        loop {
            let c = changed.get(self.c)?;
            let end = c.offset + c.length;
            let pos = self.pos.max(c.offset);
            if pos >= end {
                self.c += 1;
                continue;
            }
            while self
                .allocated
                .get(self.a)
                .is_some_and(|x| x.length == 0 || x.offset + x.length <= pos)
            {
                self.a += 1;
            }
            let piece = match self.allocated.get(self.a) {
                Some(x) if x.offset < end => {
                    if x.offset > pos {
                        Piece::Zero(extent(pos, x.offset))
                    } else {
                        Piece::Data(extent(pos, end.min(x.offset + x.length)))
                    }
                }
                _ => Piece::Zero(extent(pos, end)),
            };
            let e = match piece {
                Piece::Data(e) | Piece::Zero(e) => e,
            };
            self.pos = e.offset + e.length;
            return Some(piece);
        }
    }
}

fn extent(start: u64, end: u64) -> Extent {
    Extent {
        offset: start,
        length: end - start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    fn pieces(p: ExportPlan<'_>) -> Vec<Piece> {
        p.pieces().collect()
    }

    #[test]
    fn full_counts_split_records() {
        let allocated = [e(0, 4096), e(1 << 20, (3 << 20) + 4096)];
        let p = ExportPlan::full(&allocated);
        assert_eq!(p.pieces().count(), 2);
        assert_eq!(
            p.totals(),
            Totals {
                records: 1 + 4,
                data_bytes: 8192 + (3 << 20),
                zero_bytes: 0
            }
        );
    }

    #[test]
    fn incremental_splits_changed_into_data_and_zero() {
        // Changed: [0,100) and [200,300); allocated: [10,20), [50,150), [250,400).
        let changed = [e(0, 100), e(200, 100)];
        let allocated = [e(10, 10), e(50, 100), e(250, 150)];
        let p = ExportPlan::incremental(&changed, &allocated);
        assert_eq!(
            p.pieces().collect::<Vec<_>>(),
            [
                Piece::Zero(e(0, 10)),
                Piece::Data(e(10, 10)),
                Piece::Zero(e(20, 30)),
                Piece::Data(e(50, 50)),
                Piece::Zero(e(200, 50)),
                Piece::Data(e(250, 50)),
            ]
        );
        assert_eq!(p.totals().data_bytes, 110);
        assert_eq!(p.totals().zero_bytes, 90);
        assert_eq!(p.totals().records, 6);
    }

    #[test]
    fn incremental_edge_cases() {
        assert_eq!(pieces(ExportPlan::incremental(&[], &[e(0, 10)])), []);
        assert_eq!(
            pieces(ExportPlan::incremental(&[e(0, 10)], &[])),
            [Piece::Zero(e(0, 10))]
        );
        // An allocated extent covering the changed one and more.
        assert_eq!(
            pieces(ExportPlan::incremental(&[e(10, 10)], &[e(0, 100)])),
            [Piece::Data(e(10, 10))]
        );
        // One allocated extent spanning two changed extents.
        assert_eq!(
            pieces(ExportPlan::incremental(&[e(0, 10), e(20, 10)], &[e(5, 20)])),
            [
                Piece::Zero(e(0, 5)),
                Piece::Data(e(5, 5)),
                Piece::Data(e(20, 5)),
                Piece::Zero(e(25, 5)),
            ]
        );
    }

    /// Merged extents of the set blocks in `bits` (block size 1).
    fn runs(bits: &[bool]) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (i, _) in bits.iter().enumerate().filter(|(_, &b)| b) {
            match out.last_mut() {
                Some(x) if x.offset + x.length == i as u64 => x.length += 1,
                _ => out.push(e(i as u64, 1)),
            }
        }
        out
    }

    #[test]
    fn plans_match_a_block_by_block_oracle() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..500 {
            let n = 1 + rnd(200) as usize;
            let (pc, pa) = (rnd(100), rnd(100));
            let changed: Vec<bool> = (0..n).map(|_| rnd(100) < pc).collect();
            let allocated: Vec<bool> = (0..n).map(|_| rnd(100) < pa).collect();
            let (ce, ae) = (runs(&changed), runs(&allocated));
            for (plan, want_data, want_zero) in [
                (ExportPlan::full(&ae), allocated.clone(), vec![false; n]),
                (
                    ExportPlan::incremental(&ce, &ae),
                    (0..n).map(|i| changed[i] && allocated[i]).collect(),
                    (0..n).map(|i| changed[i] && !allocated[i]).collect(),
                ),
            ] {
                let (mut data, mut zero) = (vec![false; n], vec![false; n]);
                let mut last_end = 0;
                for p in plan.pieces() {
                    let (Piece::Data(x) | Piece::Zero(x)) = p;
                    assert!(
                        x.length > 0 && x.offset >= last_end,
                        "{p:?} unsorted or empty"
                    );
                    last_end = x.offset + x.length;
                    let set = if matches!(p, Piece::Data(_)) {
                        &mut data
                    } else {
                        &mut zero
                    };
                    for b in x.offset..last_end {
                        set[b as usize] = true;
                    }
                }
                assert_eq!(data, want_data);
                assert_eq!(zero, want_zero);
                let t = plan.totals();
                assert_eq!(
                    t.data_bytes,
                    want_data.iter().filter(|&&b| b).count() as u64
                );
                assert_eq!(
                    t.zero_bytes,
                    want_zero.iter().filter(|&&b| b).count() as u64
                );
            }
        }
    }
}
