//! The on-disk form of a layer map: an append-only log of checksummed records.
//!
//! The head appends one `Delta` record per flush (the final state of every block touched
//! since the previous flush), so the log only ever grows at its end and a crash can tear
//! only its last record. Sealing a layer appends `Seal`; compaction rewrites the log as one
//! `Checkpoint` (+ `Seal`) through an atomic rename.
//!
//! Layout (little endian; version 1: an identity layer, block `b` at `b * block_size` in
//! its data file; version 2: a slotted layer, whose records also carry placements, see
//! `slots`):
//! - header, 32 bytes: magic `SNAPBLKM`, version u32, reserved u32, layer id u64,
//!   crc32c of the first 24 bytes u32, 4 bytes zero;
//! - records: magic u32 `0x314D4C53`, kind u8, 3 bytes zero, payload length u32,
//!   crc32c u32 over kind, length and payload, then the payload.
//!   Kinds: 1 Delta (payload: three length-prefixed portable roaring bitmaps: the blocks
//!   touched, those of them holding data, those of them reading as zeros), 2 Checkpoint
//!   (two bitmaps: present, zeroed), 3 Seal (empty payload). In version 2, Delta and
//!   Checkpoint payloads end with a placement list (`slots::encode_runs`): the slots of
//!   the touched blocks that have one (Delta), of every placed block (Checkpoint).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;

use super::error::{EngineError, Result};
use super::fsutil;
use super::layermap::LayerMap;
use super::slots::{self, SlotRun, SlotTable};

const MAGIC: &[u8; 8] = b"SNAPBLKM";
/// Version of the map log of an identity layer (block `b` at `b * block_size`).
pub const VERSION: u32 = 1;
/// Version of the map log of a slotted layer (blocks at the slots its records name).
pub const VERSION_SLOTTED: u32 = 2;
const HEADER_LEN: u64 = 32;
const REC_MAGIC: u32 = 0x314D_4C53;
const REC_HEADER_LEN: usize = 16;
/// Upper bound for one record, for the writer and the reader alike: a delta of a fully
/// and randomly written 2^32-block layer holds three bitmaps of at most 512 MiB each.
const MAX_RECORD: u64 = 2 << 30;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Delta = 1,
    Checkpoint = 2,
    Seal = 3,
}

/// What a replay found.
pub struct Replayed {
    pub map: LayerMap,
    /// The placements of a slotted layer (None: an identity layer).
    pub slots: Option<SlotTable>,
    /// The log ends with a Seal record.
    pub sealed: bool,
    /// Bytes of the log that were valid (a torn tail past this was dropped).
    pub valid_len: u64,
    /// Bytes of a torn last record that were dropped.
    pub torn_bytes: u64,
}

/// An open map log that records can be appended to.
pub struct MapLog {
    file: File,
    path: PathBuf,
    len: u64,
    /// A failed append could not be cut back: the file may end with part of a record.
    damaged: bool,
    /// Records carry placements (version 2).
    slotted: bool,
}

impl MapLog {
    /// Creates a new, empty log for `layer_id` at `path` (not yet durable: sync it and its
    /// directory before anything refers to it).
    pub fn create(path: &Path, layer_id: u64, slotted: bool) -> Result<MapLog> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(fsutil::PRIVATE_FILE)
            .open(path)
            .map_err(|e| EngineError::io(path, e))?;
        file.write_all_at(&header(layer_id, slotted), 0)
            .map_err(|e| EngineError::io(path, e))?;
        Ok(MapLog {
            file,
            path: path.to_path_buf(),
            len: HEADER_LEN,
            damaged: false,
            slotted,
        })
    }

    /// Writes a fresh log holding `map` (and the placements `slots` of a slotted layer)
    /// as one checkpoint (and a seal if `sealed`), and atomically puts it at `path`,
    /// replacing any older log there.
    pub fn write_compacted(
        path: &Path,
        layer_id: u64,
        map: &LayerMap,
        slots: Option<&SlotTable>,
        sealed: bool,
    ) -> Result<MapLog> {
        let mut bytes = header(layer_id, slots.is_some()).to_vec();
        let mut payload = Vec::with_capacity(map.serialized_size() + 16);
        LayerMap::encode(&[&map.present, &map.zeroed], &mut payload);
        if let Some(t) = slots {
            slots::encode_runs(&t.runs(), &mut payload);
        }
        push_record(&mut bytes, Kind::Checkpoint, &payload)?;
        if sealed {
            push_record(&mut bytes, Kind::Seal, &[])?;
        }
        fsutil::atomic_write(path, &bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| EngineError::io(path, e))?;
        Ok(MapLog {
            file,
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            damaged: false,
            slotted: slots.is_some(),
        })
    }

    /// Opens the log of a head layer for appending: replays it, drops a torn last record
    /// (an unflushed change lost in a crash), and positions appends after the valid part.
    /// A journal whose creation a crash interrupted is started over as a `slotted` one
    /// or not.
    pub fn open_head(path: &Path, layer_id: u64, slotted: bool) -> Result<(MapLog, Replayed)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| EngineError::io(path, e))?;
        let size = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        if size < HEADER_LEN || is_all_zero(&file, path, size)? {
            // Created just before a crash and never flushed: nothing was recorded in it.
            tracing::info!(path = %path.display(), "rewriting the header of a head journal whose creation was interrupted");
            file.set_len(0).map_err(|e| EngineError::io(path, e))?;
            file.write_all_at(&header(layer_id, slotted), 0)
                .map_err(|e| EngineError::io(path, e))?;
        }
        let replayed = replay(&file, path, layer_id, true)?;
        if replayed.torn_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = replayed.torn_bytes,
                "dropping a torn record at the end of the map log (an unflushed change)"
            );
            file.set_len(replayed.valid_len)
                .map_err(|e| EngineError::io(path, e))?;
        }
        let len = replayed.valid_len;
        Ok((
            MapLog {
                file,
                path: path.to_path_buf(),
                len,
                damaged: false,
                slotted: replayed.slots.is_some(),
            },
            replayed,
        ))
    }

    /// Reads the map (and placements, for a slotted layer) of a frozen layer; the log must
    /// be whole and end with a seal.
    pub fn read_sealed(path: &Path, layer_id: u64) -> Result<(LayerMap, Option<SlotTable>)> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let r = replay(&file, path, layer_id, false)?;
        if !r.sealed {
            return Err(EngineError::corrupt(
                path,
                "the map of a frozen layer does not end with a seal record (truncated?)",
            ));
        }
        Ok((r.map, r.slots))
    }

    /// Appends the final state of the `touched` blocks (not durable until [`MapLog::sync`]).
    /// `placed` (a slotted layer's only) are the slots of the touched blocks.
    pub fn append_delta(
        &mut self,
        touched: &RoaringBitmap,
        present: &RoaringBitmap,
        zeroed: &RoaringBitmap,
        placed: &[SlotRun],
    ) -> Result<()> {
        let size = touched.serialized_size() + present.serialized_size() + zeroed.serialized_size();
        let mut payload = Vec::with_capacity(size + 32 + placed.len() * 12);
        LayerMap::encode(&[touched, present, zeroed], &mut payload);
        if self.slotted {
            slots::encode_runs(placed, &mut payload);
        } else if !placed.is_empty() {
            return Err(EngineError::Invalid(
                "placements for a layer that keeps blocks at their own offsets".into(),
            ));
        }
        self.append(Kind::Delta, &payload)
    }

    /// Appends a seal: the layer is frozen from here on.
    pub fn append_seal(&mut self) -> Result<()> {
        self.append(Kind::Seal, &[])
    }

    fn append(&mut self, kind: Kind, payload: &[u8]) -> Result<()> {
        if self.damaged {
            return Err(EngineError::io(
                &self.path,
                std::io::Error::other("a failed append could not be cut back from the journal"),
            ));
        }
        let mut rec = Vec::with_capacity(REC_HEADER_LEN + payload.len());
        push_record(&mut rec, kind, payload)?;
        let written = match super::faults::append_fault() {
            // A write that stopped halfway (a full disk, an I/O error), for tests.
            Some(e) => self
                .file
                .write_all_at(&rec[..rec.len() / 2], self.len)
                .and(Err(e)),
            None => self.file.write_all_at(&rec, self.len),
        };
        if let Err(e) = written {
            // Cut off what part of the record reached the file: the next append goes
            // here, and a shorter record would leave the rest behind, which the reader
            // could not tell from damage.
            if self.file.set_len(self.len).is_err() {
                self.damaged = true;
            }
            return Err(EngineError::io(&self.path, e));
        }
        self.len += rec.len() as u64;
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> Result<()> {
        fsutil::sync_data(&self.file, &self.path)
    }

    /// True when a failed append may have left part of a record at the end of the file
    /// (cutting it back failed too): nothing may be appended after it.
    pub fn damaged(&self) -> bool {
        self.damaged
    }

    /// True when the file at the journal's path is the one open here (a compaction that
    /// failed after its rename replaced it).
    pub fn is_current(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// Current length in bytes (for deciding when to compact).
    pub fn len(&self) -> u64 {
        self.len
    }
}

/// True when a small file holds only zeros (allocated, never written).
fn is_all_zero(file: &File, path: &Path, size: u64) -> Result<bool> {
    if size > 1 << 20 {
        return Ok(false);
    }
    let mut buf = vec![0u8; size as usize];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| EngineError::io(path, e))?;
    Ok(buf.iter().all(|&b| b == 0))
}

fn header(layer_id: u64, slotted: bool) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    let version = if slotted { VERSION_SLOTTED } else { VERSION };
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[16..24].copy_from_slice(&layer_id.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The length field of a record of `len` payload bytes, or an error past [`MAX_RECORD`],
/// which the reader would refuse.
fn record_len(len: usize) -> Result<u32> {
    u32::try_from(len)
        .ok()
        .filter(|&l| u64::from(l) <= MAX_RECORD)
        .ok_or_else(|| {
            EngineError::Invalid(format!(
                "a map record of {len} bytes is larger than the {MAX_RECORD} bytes a journal may hold"
            ))
        })
}

fn push_record(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) -> Result<()> {
    let len = record_len(payload.len())?;
    out.extend_from_slice(&REC_MAGIC.to_le_bytes());
    out.extend_from_slice(&[kind as u8, 0, 0, 0]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_crc(kind as u8, len, payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

fn record_crc(kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

fn replay(file: &File, path: &Path, layer_id: u64, allow_torn_tail: bool) -> Result<Replayed> {
    let size = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
    if size < HEADER_LEN {
        return Err(EngineError::corrupt(
            path,
            format!("map log is {size} bytes, shorter than its header"),
        ));
    }
    let mut bytes = vec![0u8; size as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| EngineError::io(path, e))?;
    replay_bytes(&bytes, path, layer_id, allow_torn_tail)
}

/// Replays the whole content of a map log read from `path` (named in errors).
pub(crate) fn replay_bytes(
    bytes: &[u8],
    path: &Path,
    layer_id: u64,
    allow_torn_tail: bool,
) -> Result<Replayed> {
    if bytes.len() < HEADER_LEN as usize {
        return Err(EngineError::corrupt(
            path,
            format!("map log is {} bytes, shorter than its header", bytes.len()),
        ));
    }
    let slotted = check_header(&bytes[..HEADER_LEN as usize], path, layer_id)?;

    let mut map = LayerMap::default();
    let mut table = slotted.then(SlotTable::default);
    let mut sealed = false;
    let mut pos = HEADER_LEN as usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        match parse_record(rest) {
            Ok((kind, payload, total)) => {
                match kind {
                    Kind::Delta => {
                        let ([t, p, z], placed) = LayerMap::decode_prefix::<3>(payload)
                            .and_then(|(bms, rest)| Ok((bms, placements(slotted, rest)?)))
                            .map_err(|e| {
                                EngineError::corrupt(path, format!("record at byte {pos}: {e}"))
                            })?;
                        map.apply(&t, &p, &z);
                        if let Some(table) = &mut table {
                            placed.into_iter().for_each(|r| table.set_run(r));
                        }
                        sealed = false;
                    }
                    Kind::Checkpoint => {
                        let ([p, z], placed) = LayerMap::decode_prefix::<2>(payload)
                            .and_then(|(bms, rest)| Ok((bms, placements(slotted, rest)?)))
                            .map_err(|e| {
                                EngineError::corrupt(path, format!("record at byte {pos}: {e}"))
                            })?;
                        map = LayerMap {
                            present: p,
                            zeroed: z,
                        };
                        if let Some(table) = &mut table {
                            *table = SlotTable::default();
                            placed.into_iter().for_each(|r| table.set_run(r));
                        }
                        sealed = false;
                    }
                    Kind::Seal => sealed = true,
                }
                pos += total;
            }
            Err(reason) => {
                if allow_torn_tail && is_torn_tail(rest) {
                    return Ok(Replayed {
                        map,
                        slots: table,
                        sealed,
                        valid_len: pos as u64,
                        torn_bytes: rest.len() as u64,
                    });
                }
                return Err(EngineError::corrupt(
                    path,
                    format!("record at byte {pos}: {reason}"),
                ));
            }
        }
    }
    Ok(Replayed {
        map,
        slots: table,
        sealed,
        valid_len: pos as u64,
        torn_bytes: 0,
    })
}

/// What follows a record's bitmaps: the placements of a slotted log, nothing otherwise.
fn placements(slotted: bool, rest: &[u8]) -> std::io::Result<Vec<SlotRun>> {
    if slotted {
        slots::decode_runs(rest)
    } else if rest.is_empty() {
        Ok(Vec::new())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "trailing bytes after the bitmaps",
        ))
    }
}

/// Checks a header; returns whether the layer is slotted.
fn check_header(h: &[u8], path: &Path, layer_id: u64) -> Result<bool> {
    if &h[..8] != MAGIC {
        return Err(EngineError::corrupt(
            path,
            "not a snapblk map log (bad magic)",
        ));
    }
    let crc = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    if crc != crc32c::crc32c(&h[..24]) {
        return Err(EngineError::corrupt(
            path,
            "map log header checksum mismatch",
        ));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != VERSION && version != VERSION_SLOTTED {
        return Err(EngineError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: VERSION_SLOTTED,
        });
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[16..24]);
    let found = u64::from_le_bytes(id);
    if found != layer_id {
        return Err(EngineError::corrupt(
            path,
            format!("map log belongs to layer {found}, expected layer {layer_id}"),
        ));
    }
    Ok(version == VERSION_SLOTTED)
}

/// Parses one record: (kind, payload, total bytes) or why it is not a valid record.
fn parse_record(rest: &[u8]) -> std::result::Result<(Kind, &[u8], usize), String> {
    if rest.len() < REC_HEADER_LEN {
        return Err(format!(
            "{} bytes left, shorter than a record header",
            rest.len()
        ));
    }
    let word = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
    if word(0) != REC_MAGIC {
        return Err("bad record magic".into());
    }
    let kind = match rest[4] {
        1 => Kind::Delta,
        2 => Kind::Checkpoint,
        3 => Kind::Seal,
        k => return Err(format!("unknown record kind {k}")),
    };
    let len = word(8);
    if u64::from(len) > MAX_RECORD || REC_HEADER_LEN + len as usize > rest.len() {
        return Err(format!("record length {len} runs past the end of the log"));
    }
    let payload = &rest[REC_HEADER_LEN..REC_HEADER_LEN + len as usize];
    if word(12) != record_crc(rest[4], len, payload) {
        return Err("record checksum mismatch".into());
    }
    Ok((kind, payload, REC_HEADER_LEN + len as usize))
}

/// A bad record can be the torn end of an interrupted append only if nothing valid can
/// follow it: the rest is zeros (space allocated, never written) or a record header whose
/// claimed length reaches the end of the file (a prefix of the record).
fn is_torn_tail(rest: &[u8]) -> bool {
    if rest.iter().all(|&b| b == 0) || rest.len() < REC_HEADER_LEN {
        return true;
    }
    let word = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
    word(0) == REC_MAGIC && REC_HEADER_LEN as u64 + u64::from(word(8)) >= rest.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(written: (u32, u64), zeroed: (u32, u64)) -> LayerMap {
        let mut m = LayerMap::default();
        m.mark_written(written.0, written.1);
        m.mark_zeroed(zeroed.0, zeroed.1);
        m
    }

    #[test]
    fn a_failed_append_leaves_nothing_the_reader_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("3.map");
        let mut log = MapLog::create(&path, 3, false).expect("create");
        let big = map((0, 5000), (6000, 9000));
        let mut scattered = RoaringBitmap::new();
        scattered.extend((0..20_000u32).map(|b| b * 7));
        crate::engine::faults::fail_append_after(1);
        assert!(log
            .append_delta(&scattered, &scattered, &RoaringBitmap::new(), &[])
            .is_err());
        // A short record lands where the failed one started.
        log.append_delta(&big.cover(), &big.present, &big.zeroed, &[])
            .expect("append after the failure");
        log.sync().expect("sync");
        let (_, r) = MapLog::open_head(&path, 3, false).expect("the journal still opens");
        assert_eq!(r.map, big);
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            log.len(),
            "nothing after the last record"
        );
    }

    #[test]
    fn writer_and_reader_share_one_record_limit() {
        assert!(record_len(MAX_RECORD as usize).is_ok());
        assert!(record_len(MAX_RECORD as usize + 1).is_err());
        assert!(record_len(u32::MAX as usize + 1).is_err());
    }

    #[test]
    fn deltas_replay_in_order_and_seal_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("1.map");
        let mut log = MapLog::create(&path, 1, false).expect("create");
        let a = map((0, 10), (20, 30));
        log.append_delta(&a.cover(), &a.present, &a.zeroed, &[])
            .expect("append");
        let b = map((25, 26), (0, 2));
        log.append_delta(&b.cover(), &b.present, &b.zeroed, &[])
            .expect("append");
        log.sync().expect("sync");
        let (_, r) = MapLog::open_head(&path, 1, false).expect("open");
        let mut want = a.clone();
        want.apply(&b.cover(), &b.present, &b.zeroed);
        assert_eq!(r.map, want);
        assert!(!r.sealed);
        assert!(
            MapLog::read_sealed(&path, 1).is_err(),
            "unsealed log read as frozen"
        );
        log.append_seal().expect("seal");
        assert_eq!(MapLog::read_sealed(&path, 1).expect("sealed").0, want);
    }

    #[test]
    fn torn_tail_is_dropped_for_a_head_and_refused_for_a_frozen_layer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("2.map");
        let mut log = MapLog::create(&path, 2, false).expect("create");
        let a = map((0, 4), (9, 9));
        log.append_delta(&a.cover(), &a.present, &a.zeroed, &[])
            .expect("append");
        let good = log.len();
        let b = map((100, 200), (9, 9));
        log.append_delta(&b.cover(), &b.present, &b.zeroed, &[])
            .expect("append");
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(log.len() - 3).expect("truncate");
        let (log2, r) = MapLog::open_head(&path, 2, false).expect("torn tail tolerated");
        assert_eq!(r.map, a);
        assert_eq!(log2.len(), good);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), good);
    }

    #[test]
    fn damage_in_the_middle_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("3.map");
        let mut log = MapLog::create(&path, 3, false).expect("create");
        let a = map((0, 4), (9, 9));
        log.append_delta(&a.cover(), &a.present, &a.zeroed, &[])
            .expect("append");
        log.append_delta(&a.cover(), &a.present, &a.zeroed, &[])
            .expect("append");
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(&[0xAA], HEADER_LEN + 20).expect("flip");
        let err = MapLog::open_head(&path, 3, false).err().expect("must fail");
        assert!(err.to_string().contains("3.map"), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn a_head_journal_whose_creation_was_lost_opens_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, content) in [vec![], vec![0u8; 10], vec![0u8; 4096]]
            .into_iter()
            .enumerate()
        {
            let path = dir.path().join(format!("{i}.map"));
            std::fs::write(&path, &content).expect("write");
            let (_, r) = MapLog::open_head(&path, 9, false).expect("opens as empty");
            assert_eq!(r.map, LayerMap::default());
            assert!(
                MapLog::open_head(&path, 9, false).is_ok(),
                "header rewritten"
            );
        }
        let path = dir.path().join("junk.map");
        std::fs::write(&path, b"junk").expect("write");
        assert!(
            MapLog::read_sealed(&path, 9).is_err(),
            "a frozen map is never guessed"
        );
    }

    #[test]
    fn wrong_layer_and_bad_header_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("4.map");
        MapLog::create(&path, 4, false).expect("create");
        assert!(MapLog::open_head(&path, 5, false).is_err());
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(b"X", 0).expect("write");
        assert!(MapLog::open_head(&path, 4, false).is_err());
    }

    #[test]
    fn compaction_keeps_the_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("5.map");
        let m = map((7, 70_000), (80_000, 80_010));
        MapLog::write_compacted(&path, 5, &m, None, true).expect("compact");
        assert_eq!(MapLog::read_sealed(&path, 5).expect("read").0, m);
    }

    #[test]
    fn slotted_records_carry_placements() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("6.map");
        let mut log = MapLog::create(&path, 6, true).expect("create");
        let a = map((10, 20), (30, 31));
        log.append_delta(&a.cover(), &a.present, &a.zeroed, &[(10, 100, 10)])
            .expect("append");
        let b = map((15, 16), (40, 41));
        log.append_delta(&b.cover(), &b.present, &b.zeroed, &[(15, 7, 1)])
            .expect("append");
        let (_, r) = MapLog::open_head(&path, 6, true).expect("open");
        let t = r.slots.expect("a slotted log");
        assert_eq!(t.runs(), vec![(10, 100, 5), (15, 7, 1), (16, 106, 4)]);
        let mut m = a.clone();
        m.apply(&b.cover(), &b.present, &b.zeroed);
        assert_eq!(r.map, m);
        MapLog::write_compacted(&path, 6, &m, Some(&t), true).expect("compact");
        let (m2, t2) = MapLog::read_sealed(&path, 6).expect("read");
        assert_eq!((m2, t2), (m, Some(t)));
        // An identity log refuses placements, and a slotted one needs its list.
        let ipath = dir.path().join("7.map");
        let mut ilog = MapLog::create(&ipath, 7, false).expect("create");
        assert!(ilog
            .append_delta(&a.cover(), &a.present, &a.zeroed, &[(10, 1, 1)])
            .is_err());
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[8] = 1;
        let crc = crc32c::crc32c(&bytes[..24]);
        bytes[24..28].copy_from_slice(&crc.to_le_bytes());
        assert!(
            replay_bytes(&bytes, &path, 6, false).is_err(),
            "placements read as trailing bytes"
        );
    }
}
