//! Block runs and byte extents: how bitmaps of blocks are turned into the sorted, merged
//! `(offset, length)` lists that changed-block tracking and copies work with.

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

/// A byte range of the volume, block aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// Iterates the maximal runs `[start, end)` of consecutive blocks in `bm`, in order.
pub fn runs(bm: &RoaringBitmap) -> Runs<'_> {
    Runs {
        iter: bm.iter(),
        pending: None,
    }
}

/// Iterator returned by [`runs`].
pub struct Runs<'a> {
    iter: roaring::bitmap::Iter<'a>,
    pending: Option<(u32, u64)>,
}

impl Iterator for Runs<'_> {
    type Item = (u32, u64);

    fn next(&mut self) -> Option<(u32, u64)> {
        loop {
            match self.iter.next() {
                Some(b) => match self.pending {
                    Some((s, e)) if e == u64::from(b) => self.pending = Some((s, e + 1)),
                    Some(run) => {
                        self.pending = Some((b, u64::from(b) + 1));
                        return Some(run);
                    }
                    None => self.pending = Some((b, u64::from(b) + 1)),
                },
                None => return self.pending.take(),
            }
        }
    }
}

/// The blocks of `bm` as byte extents for a volume of `block_size`-byte blocks.
pub fn extents(bm: &RoaringBitmap, block_size: u32) -> Vec<Extent> {
    let bs = u64::from(block_size);
    runs(bm)
        .map(|(s, e)| Extent {
            offset: u64::from(s) * bs,
            length: (e - u64::from(s)) * bs,
        })
        .collect()
}

/// The blocks `[start, end)` as the inclusive range roaring takes, or None when empty
/// (`end` may be 2^32, one past the largest block index).
pub fn span(start: u32, end: u64) -> Option<std::ops::RangeInclusive<u32>> {
    (end > u64::from(start)).then(|| start..=((end - 1) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range_bitmap(start: u32, end: u64) -> RoaringBitmap {
        let mut bm = RoaringBitmap::new();
        if let Some(r) = span(start, end) {
            bm.insert_range(r);
        }
        bm
    }

    #[test]
    fn runs_merge_consecutive_blocks() {
        let bm: RoaringBitmap = [1u32, 2, 3, 7, 9, 10, 65535, 65536].into_iter().collect();
        let r: Vec<_> = runs(&bm).collect();
        assert_eq!(r, vec![(1, 4), (7, 8), (9, 11), (65535, 65537)]);
    }

    #[test]
    fn runs_of_empty_and_full_ranges() {
        assert_eq!(runs(&RoaringBitmap::new()).count(), 0);
        let bm = range_bitmap(10, 200_000);
        assert_eq!(runs(&bm).collect::<Vec<_>>(), vec![(10, 200_000)]);
        assert!(range_bitmap(5, 5).is_empty());
        assert_eq!(span(0, 1 << 32), Some(0..=u32::MAX));
        assert_eq!(span(3, 3), None);
    }

    #[test]
    fn extents_scale_by_block_size() {
        let bm: RoaringBitmap = [0u32, 1, 5].into_iter().collect();
        assert_eq!(
            extents(&bm, 4096),
            vec![
                Extent {
                    offset: 0,
                    length: 8192
                },
                Extent {
                    offset: 20480,
                    length: 4096
                }
            ]
        );
        assert_eq!(
            extents(&bm, 512)[1],
            Extent {
                offset: 2560,
                length: 512
            }
        );
    }
}
