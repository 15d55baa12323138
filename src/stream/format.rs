//! The byte layout of a stream (docs/stream-format.md), as pure encode and decode functions
//! with no I/O, so the reader and the writer share one definition and it is tested alone.
//!
//! All integers are little endian. A stream is: a header, records (data or zero extents,
//! sorted by offset), and an end record holding the trailer.

use crate::engine::validate_snapshot_name;

/// First bytes of every stream, whatever its version.
pub const MAGIC: [u8; 8] = *b"SNAPBLKS";
/// The format version this build writes and reads. Bumped on any change of layout.
pub const VERSION: u32 = 1;
/// Magic, version and header length: the part of the header that is the same in every
/// version, so a reader can check the header's checksum before trusting its version.
pub const PREFIX_LEN: usize = 16;
/// Largest header a reader accepts (the strings in it are short); bounds memory.
pub const MAX_HEADER_LEN: u32 = 4096;
/// Magic of each record header: `SBRC`.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SBRC");
/// Size of a record header.
pub const RECORD_HEADER_LEN: usize = 32;
/// Largest payload of a data record: exporters split longer extents, and readers never
/// buffer more than this.
pub const MAX_DATA_LEN: u64 = 1 << 20;
/// Size of the end record's payload (the trailer).
pub const TRAILER_LEN: usize = 40;
/// Longest volume id a header may carry.
pub const MAX_VOLUME_ID_LEN: usize = 128;

/// Fixed part of the header after the prefix, before the strings.
const FIXED_LEN: usize = 88;

/// A snapshot as a stream names it: enough to check that an incremental follows the
/// stream before it (name and id), and to tell people when it was taken.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotRef {
    /// The snapshot's name; the import gives its snapshot the same one.
    pub name: String,
    /// The snapshot's id in its source volume (ids only grow within a volume).
    pub id: u64,
    /// When the snapshot was taken, in ms since the Unix epoch: tells people which one it is.
    pub created_unix_ms: u64,
}

/// What a stream is a copy of: checked by an import against the streams before it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamSource {
    /// Id of the source volume (every snapshot of one volume shares it).
    pub volume_id: String,
    /// Size of the volume in bytes: the import creates a volume this large.
    pub volume_size: u64,
    /// Logical block size: every extent is aligned to it.
    pub block_size: u32,
    /// The snapshot whose content the stream carries.
    pub snapshot: SnapshotRef,
    /// For an incremental stream: the snapshot it applies on top of. None for a full one.
    pub base: Option<SnapshotRef>,
}

/// What the header announces about the records that follow, so a reader can show
/// progress and the trailer can be checked against it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// Records before the end record (data and zero).
    pub records: u64,
    /// Bytes of data carried by data records.
    pub data_bytes: u64,
    /// Bytes of the volume that zero records cover.
    pub zero_bytes: u64,
}

/// A stream's header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamHeader {
    /// What the stream is a copy of.
    pub source: StreamSource,
    /// What the records add up to.
    pub totals: Totals,
}

/// Kinds of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// `length` bytes of data for the volume at `offset` follow.
    Data = 1,
    /// `[offset, offset+length)` reads as zeros (hides older data); no payload.
    Zero = 2,
    /// The end record: a trailer of [`TRAILER_LEN`] bytes follows.
    End = 3,
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record is.
    pub kind: RecordKind,
    /// Volume byte offset of the extent (0 for the end record).
    pub offset: u64,
    /// Bytes of the extent (data: also of the payload; end: of the trailer).
    pub length: u64,
    /// crc32c of the payload (0 for a zero record).
    pub payload_crc: u32,
}

/// The end record's payload: what the stream held, and a checksum over all of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Trailer {
    /// Data records in the stream.
    pub data_records: u64,
    /// Zero records in the stream.
    pub zero_records: u64,
    /// Bytes of data carried.
    pub data_bytes: u64,
    /// Bytes of the volume zeroed.
    pub zero_bytes: u64,
    /// crc32c of every byte of the stream before the end record.
    pub stream_crc: u32,
}

/// A decoding failure: `at` is the byte offset inside the decoded item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bad {
    /// Byte offset inside the decoded item, added to the item's own offset in messages.
    pub at: u64,
    /// What is wrong, for people.
    pub reason: String,
}

fn bad<T>(at: usize, reason: impl Into<String>) -> Result<T, Bad> {
    Err(Bad {
        at: at as u64,
        reason: reason.into(),
    })
}

/// Little-endian field access on a slice whose length the caller has checked.
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Bad> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => bad(self.pos, "field runs past the end of the header"),
        }
    }
    fn u8(&mut self) -> Result<u8, Bad> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Bad> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, Bad> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, Bad> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn string(&mut self, what: &str) -> Result<String, Bad> {
        let at = self.pos;
        let n = self.u16()? as usize;
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => bad(at, format!("{what} is not UTF-8")),
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    // Callers validated the length (at most MAX_VOLUME_ID_LEN or a snapshot name's 128).
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Checks what a header may name, for the writer and the reader alike.
fn check_source(s: &StreamSource) -> Result<(), String> {
    let id_ok = !s.volume_id.is_empty()
        && s.volume_id.len() <= MAX_VOLUME_ID_LEN
        && s.volume_id.bytes().all(|b| b.is_ascii_graphic());
    if !id_ok {
        return Err(format!(
            "volume id {:?} is not 1 to {MAX_VOLUME_ID_LEN} printable characters",
            s.volume_id
        ));
    }
    if !s.block_size.is_power_of_two() || !(512..=65536).contains(&s.block_size) {
        return Err(format!(
            "block size {} is not a power of two from 512 to 65536",
            s.block_size
        ));
    }
    if s.volume_size == 0 || !s.volume_size.is_multiple_of(u64::from(s.block_size)) {
        return Err(format!(
            "volume size {} is not a positive multiple of the block size {}",
            s.volume_size, s.block_size
        ));
    }
    validate_snapshot_name(&s.snapshot.name).map_err(|e| e.to_string())?;
    if let Some(b) = &s.base {
        validate_snapshot_name(&b.name).map_err(|e| format!("base: {e}"))?;
        if b.id >= s.snapshot.id {
            return Err(format!(
                "base snapshot {:?} (id {}) is not older than snapshot {:?} (id {})",
                b.name, b.id, s.snapshot.name, s.snapshot.id
            ));
        }
    }
    Ok(())
}

impl StreamHeader {
    /// The header's bytes, checksum included. Refuses names the format cannot carry.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let s = &self.source;
        check_source(s)?;
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // header length, patched below
        let kind: u8 = if s.base.is_some() { 2 } else { 1 };
        out.extend_from_slice(&[kind, 0, 0, 0]);
        out.extend_from_slice(&s.block_size.to_le_bytes());
        out.extend_from_slice(&s.volume_size.to_le_bytes());
        out.extend_from_slice(&s.snapshot.id.to_le_bytes());
        out.extend_from_slice(&s.snapshot.created_unix_ms.to_le_bytes());
        let (base_id, base_ms, base_name) = match &s.base {
            Some(b) => (b.id, b.created_unix_ms, b.name.as_str()),
            None => (0, 0, ""),
        };
        out.extend_from_slice(&base_id.to_le_bytes());
        out.extend_from_slice(&base_ms.to_le_bytes());
        out.extend_from_slice(&self.totals.records.to_le_bytes());
        out.extend_from_slice(&self.totals.data_bytes.to_le_bytes());
        out.extend_from_slice(&self.totals.zero_bytes.to_le_bytes());
        debug_assert_eq!(out.len(), FIXED_LEN);
        put_string(&mut out, &s.volume_id);
        put_string(&mut out, &s.snapshot.name);
        put_string(&mut out, base_name);
        let len = (out.len() + 4) as u32;
        out[12..16].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes a whole header (prefix included) whose checksum has been verified with
    /// [`header_checksum_ok`] and whose version is [`VERSION`].
    pub fn decode(bytes: &[u8]) -> Result<StreamHeader, Bad> {
        let body = &bytes[..bytes.len().saturating_sub(4)];
        let mut f = Fields {
            bytes: body,
            pos: PREFIX_LEN,
        };
        let kind = f.u8()?;
        if !matches!(kind, 1 | 2) {
            return bad(PREFIX_LEN, format!("unknown stream kind {kind}"));
        }
        if f.take(3)? != [0, 0, 0] {
            return bad(PREFIX_LEN + 1, "reserved header bytes are not zero");
        }
        let block_size = f.u32()?;
        let volume_size = f.u64()?;
        let snap_id = f.u64()?;
        let snap_ms = f.u64()?;
        let base_id = f.u64()?;
        let base_ms = f.u64()?;
        let totals = Totals {
            records: f.u64()?,
            data_bytes: f.u64()?,
            zero_bytes: f.u64()?,
        };
        let volume_id = f.string("volume id")?;
        let snap_name = f.string("snapshot name")?;
        let base_at = f.pos;
        let base_name = f.string("base snapshot name")?;
        if f.pos != body.len() {
            return bad(f.pos, "unexpected bytes at the end of the header");
        }
        let base = if kind == 2 {
            Some(SnapshotRef {
                name: base_name,
                id: base_id,
                created_unix_ms: base_ms,
            })
        } else {
            if base_id != 0 || base_ms != 0 || !base_name.is_empty() {
                return bad(base_at, "a full stream names a base snapshot");
            }
            None
        };
        let source = StreamSource {
            volume_id,
            volume_size,
            block_size,
            snapshot: SnapshotRef {
                name: snap_name,
                id: snap_id,
                created_unix_ms: snap_ms,
            },
            base,
        };
        if let Err(reason) = check_source(&source) {
            return bad(PREFIX_LEN, reason);
        }
        let covered = totals.data_bytes.checked_add(totals.zero_bytes);
        if covered.is_none_or(|c| c > volume_size) {
            return bad(
                PREFIX_LEN,
                format!(
                    "announced {} data bytes and {} zero bytes do not fit in a volume of {volume_size} bytes",
                    totals.data_bytes, totals.zero_bytes
                ),
            );
        }
        Ok(StreamHeader { source, totals })
    }
}

/// Decodes the fixed prefix: returns (version, header length). Checks the magic and that
/// the length is plausible; the version is only to be trusted once the checksum holds.
pub fn decode_prefix(prefix: &[u8; PREFIX_LEN]) -> Result<(u32, u32), Bad> {
    if prefix[..8] != MAGIC {
        return bad(0, "not a snapblk stream (bad magic)");
    }
    let mut f = Fields {
        bytes: prefix,
        pos: 8,
    };
    let version = f.u32()?;
    let len = f.u32()?;
    let min = (PREFIX_LEN + 4) as u32;
    if !(min..=MAX_HEADER_LEN).contains(&len) {
        return bad(
            12,
            format!("header length {len} is outside {min}..={MAX_HEADER_LEN}"),
        );
    }
    Ok((version, len))
}

/// True when the header's last four bytes are the crc32c of the bytes before them.
pub fn header_checksum_ok(header: &[u8]) -> bool {
    if header.len() < 4 {
        return false;
    }
    let (body, crc) = header.split_at(header.len() - 4);
    let mut b = [0u8; 4];
    b.copy_from_slice(crc);
    crc32c::crc32c(body) == u32::from_le_bytes(b)
}

impl RecordHeader {
    /// The record header's bytes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.length.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a record header (magic, checksum, kind, reserved bytes).
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Result<RecordHeader, Bad> {
        let mut f = Fields { bytes: b, pos: 0 };
        let magic = f.u32()?;
        if magic != RECORD_MAGIC {
            return bad(
                0,
                format!("expected a record (magic {RECORD_MAGIC:#010x}), found {magic:#010x}"),
            );
        }
        let kind = f.u8()?;
        let reserved = f.take(3)?;
        let offset = f.u64()?;
        let length = f.u64()?;
        let payload_crc = f.u32()?;
        let crc = f.u32()?;
        if crc32c::crc32c(&b[..28]) != crc {
            return bad(28, "record header checksum mismatch");
        }
        let kind = match kind {
            1 => RecordKind::Data,
            2 => RecordKind::Zero,
            3 => RecordKind::End,
            k => return bad(4, format!("unknown record kind {k}")),
        };
        if reserved != [0, 0, 0] {
            return bad(5, "reserved record bytes are not zero");
        }
        Ok(RecordHeader {
            kind,
            offset,
            length,
            payload_crc,
        })
    }
}

impl Trailer {
    /// The trailer's bytes (the end record's payload).
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(&self.data_records.to_le_bytes());
        b[8..16].copy_from_slice(&self.zero_records.to_le_bytes());
        b[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.zero_bytes.to_le_bytes());
        b[32..36].copy_from_slice(&self.stream_crc.to_le_bytes());
        b
    }

    /// Decodes a trailer whose checksum (in the end record's header) has been verified.
    pub fn decode(b: &[u8; TRAILER_LEN]) -> Result<Trailer, Bad> {
        let mut f = Fields { bytes: b, pos: 0 };
        let t = Trailer {
            data_records: f.u64()?,
            zero_records: f.u64()?,
            data_bytes: f.u64()?,
            zero_bytes: f.u64()?,
            stream_crc: f.u32()?,
        };
        if f.take(4)? != [0, 0, 0, 0] {
            return bad(36, "reserved trailer bytes are not zero");
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(base: bool) -> StreamHeader {
        StreamHeader {
            source: StreamSource {
                volume_id: "0123456789abcdef0123456789abcdef".into(),
                volume_size: 1 << 30,
                block_size: 4096,
                snapshot: SnapshotRef {
                    name: "daily-2".into(),
                    id: 7,
                    created_unix_ms: 1_700_000_000_123,
                },
                base: base.then(|| SnapshotRef {
                    name: "daily-1".into(),
                    id: 5,
                    created_unix_ms: 1_699_000_000_000,
                }),
            },
            totals: Totals {
                records: 3,
                data_bytes: 8192,
                zero_bytes: 4096,
            },
        }
    }

    fn roundtrip(h: &StreamHeader) -> StreamHeader {
        let bytes = h.encode().expect("encode");
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&bytes[..PREFIX_LEN]);
        let (version, len) = decode_prefix(&prefix).expect("prefix");
        assert_eq!(version, VERSION);
        assert_eq!(len as usize, bytes.len());
        assert!(header_checksum_ok(&bytes));
        StreamHeader::decode(&bytes).expect("decode")
    }

    #[test]
    fn the_checksum_is_crc32c() {
        // The check value docs/stream-format.md gives for the algorithm.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn headers_roundtrip() {
        for base in [false, true] {
            let h = header(base);
            assert_eq!(roundtrip(&h), h);
        }
    }

    #[test]
    fn every_header_byte_is_covered_by_the_checksum() {
        let bytes = header(true).encode().expect("encode");
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(!header_checksum_ok(&b), "flip at {i} not seen");
        }
    }

    #[test]
    fn headers_that_cannot_be_written_are_refused() {
        let mut h = header(true);
        h.source.base.as_mut().expect("base").id = 7;
        assert!(h.encode().expect_err("same id").contains("not older"));
        let mut h = header(false);
        h.source.snapshot.name = "../x".into();
        assert!(h.encode().is_err());
        let mut h = header(false);
        h.source.volume_size = 4095;
        assert!(h.encode().is_err());
    }

    #[test]
    fn records_and_trailers_roundtrip() {
        let r = RecordHeader {
            kind: RecordKind::Zero,
            offset: 1 << 40,
            length: 4096,
            payload_crc: 0,
        };
        assert_eq!(RecordHeader::decode(&r.encode()), Ok(r));
        for i in 0..RECORD_HEADER_LEN {
            let mut b = r.encode();
            b[i] ^= 1;
            assert!(RecordHeader::decode(&b).is_err(), "flip at {i} not seen");
        }
        let t = Trailer {
            data_records: 1,
            zero_records: 2,
            data_bytes: 3,
            zero_bytes: 4,
            stream_crc: 0xdead_beef,
        };
        assert_eq!(Trailer::decode(&t.encode()), Ok(t));
    }
}
