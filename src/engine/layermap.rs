//! The map of one layer: which blocks it holds data for, and which it hides as zeros.
//! These two roaring bitmaps are the "dirty map" of the design; everything the engine
//! knows about where a block lives is derived from them.

use std::io::{self, Read};

use roaring::RoaringBitmap;

use super::extent::span;

/// The blocks a layer owns: `present` holds data in the layer's file, `zeroed` reads as
/// zeros and hides older layers. The two sets never overlap.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerMap {
    pub present: RoaringBitmap,
    pub zeroed: RoaringBitmap,
}

impl LayerMap {
    /// Records that `[start, end)` now holds data in this layer.
    pub fn mark_written(&mut self, start: u32, end: u64) {
        if let Some(r) = span(start, end) {
            self.present.insert_range(r.clone());
            self.zeroed.remove_range(r);
        }
    }

    /// Records that `[start, end)` now reads as zeros, hiding older layers.
    pub fn mark_zeroed(&mut self, start: u32, end: u64) {
        if let Some(r) = span(start, end) {
            self.zeroed.insert_range(r.clone());
            self.present.remove_range(r);
        }
    }

    /// Blocks this layer decides (data or zeros): older layers are hidden there.
    pub fn cover(&self) -> RoaringBitmap {
        &self.present | &self.zeroed
    }

    /// Applies a journalled change: every block of `touched` takes its final state, data
    /// for those in `present`, zeros for those in `zeroed`, nothing for the rest.
    pub fn apply(
        &mut self,
        touched: &RoaringBitmap,
        present: &RoaringBitmap,
        zeroed: &RoaringBitmap,
    ) {
        self.present -= touched;
        self.zeroed -= touched;
        self.present |= present;
        self.zeroed |= zeroed;
    }

    /// Forgets `[start, end)`: neither data nor zeros in this layer (older layers show).
    pub fn clear(&mut self, start: u32, end: u64) {
        if let Some(r) = span(start, end) {
            self.present.remove_range(r.clone());
            self.zeroed.remove_range(r);
        }
    }

    /// This map laid over `lower`: the map of a layer that replaces both.
    pub fn over(&self, lower: &LayerMap) -> LayerMap {
        let cover = self.cover();
        LayerMap {
            present: (&lower.present - &cover) | &self.present,
            zeroed: (&lower.zeroed - &cover) | &self.zeroed,
        }
    }

    /// Shrinks the bitmaps' containers (runs for sequential data).
    pub fn optimize(&mut self) {
        self.present.optimize();
        self.zeroed.optimize();
    }

    /// Bytes the bitmaps take when serialized: a close estimate of their memory.
    pub fn serialized_size(&self) -> usize {
        self.present.serialized_size() + self.zeroed.serialized_size()
    }

    /// Serializes bitmaps (portable roaring format, each prefixed with its length).
    pub fn encode(bitmaps: &[&RoaringBitmap], out: &mut Vec<u8>) {
        for bm in bitmaps {
            out.extend_from_slice(&(bm.serialized_size() as u64).to_le_bytes());
            // Writing to a Vec cannot fail.
            let _ = bm.serialize_into(&mut *out);
        }
    }

    /// Reverse of [`LayerMap::encode`] for exactly `N` bitmaps; refuses trailing or
    /// missing bytes.
    #[cfg(test)]
    pub fn decode<const N: usize>(bytes: &[u8]) -> io::Result<[RoaringBitmap; N]> {
        let (out, rest) = Self::decode_prefix::<N>(bytes)?;
        if !rest.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "trailing bytes after the bitmaps",
            ));
        }
        Ok(out)
    }

    /// Decodes `N` bitmaps from the start of `bytes`; returns them and what follows.
    pub fn decode_prefix<const N: usize>(
        mut bytes: &[u8],
    ) -> io::Result<([RoaringBitmap; N], &[u8])> {
        let mut out: [RoaringBitmap; N] = std::array::from_fn(|_| RoaringBitmap::new());
        for slot in out.iter_mut() {
            let mut len = [0u8; 8];
            bytes.read_exact(&mut len)?;
            let len = u64::from_le_bytes(len);
            if len > bytes.len() as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bitmap length past the record",
                ));
            }
            let (head, rest) = bytes.split_at(len as usize);
            *slot = RoaringBitmap::deserialize_from(head)?;
            bytes = rest;
        }
        Ok((out, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_and_zero_stay_disjoint() {
        let mut m = LayerMap::default();
        m.mark_written(0, 10);
        m.mark_zeroed(5, 15);
        assert_eq!(m.present.len(), 5);
        assert_eq!(m.zeroed.len(), 10);
        assert!(m.present.is_disjoint(&m.zeroed));
        m.mark_written(12, 13);
        assert!(m.present.contains(12) && !m.zeroed.contains(12));
    }

    #[test]
    fn apply_equals_replaying_the_ops() {
        let mut a = LayerMap::default();
        a.mark_written(0, 8);
        a.mark_zeroed(20, 30);
        let mut delta = LayerMap::default();
        delta.mark_zeroed(2, 4);
        delta.mark_written(25, 27);
        let mut b = a.clone();
        let touched: RoaringBitmap = delta.cover();
        b.apply(&touched, &delta.present, &delta.zeroed);
        a.mark_zeroed(2, 4);
        a.mark_written(25, 27);
        assert_eq!(a, b);
    }

    #[test]
    fn over_hides_lower_blocks() {
        let mut lower = LayerMap::default();
        lower.mark_written(0, 10);
        lower.mark_zeroed(10, 20);
        let mut upper = LayerMap::default();
        upper.mark_zeroed(0, 2);
        upper.mark_written(15, 16);
        let m = upper.over(&lower);
        assert!(m.zeroed.contains(0) && !m.present.contains(0));
        assert!(m.present.contains(5));
        assert!(m.present.contains(15) && !m.zeroed.contains(15));
        assert!(m.zeroed.contains(12));
        assert!(m.present.is_disjoint(&m.zeroed));
    }

    #[test]
    fn encode_decode_round_trip_and_rejects_garbage() {
        let mut m = LayerMap::default();
        m.mark_written(3, 70_000);
        m.mark_zeroed(100_000, 100_005);
        let mut buf = Vec::new();
        LayerMap::encode(&[&m.present, &m.zeroed], &mut buf);
        let [p, z] = LayerMap::decode::<2>(&buf).expect("round trip");
        assert_eq!((p, z), (m.present.clone(), m.zeroed.clone()));
        assert!(LayerMap::decode::<2>(&buf[..buf.len() - 1]).is_err());
        assert!(LayerMap::decode::<3>(&buf).is_err());
        let mut longer = buf.clone();
        longer.push(0);
        assert!(LayerMap::decode::<2>(&longer).is_err());
        assert!(LayerMap::decode::<2>(&[0xff; 16]).is_err());
    }
}
