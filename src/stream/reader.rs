//! Reads a stream from any `Read` and hands out its records one at a time, each checked
//! (header checksum, payload checksum, order, bounds) before the caller sees it. The end
//! record's trailer is checked against what was read; only then does the reader report
//! the end. Memory is one record's payload, at most 1 MiB, whatever the stream's size.

use std::io::{ErrorKind, Read};

use super::error::{Result, StreamError};
use super::format::{
    decode_prefix, header_checksum_ok, Bad, RecordHeader, RecordKind, StreamHeader, Trailer,
    MAX_DATA_LEN, PREFIX_LEN, RECORD_HEADER_LEN, TRAILER_LEN, VERSION,
};

/// One verified record.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// The volume's content at `offset`; its checksum has been verified.
    Data { offset: u64, data: &'a [u8] },
    /// `[offset, offset+length)` reads as zeros.
    Zero { offset: u64, length: u64 },
}

/// A stream being read. Open it with [`StreamReader::open`] (which reads and checks the
/// header), then call [`StreamReader::next_record`] until it returns `None`.
pub struct StreamReader<R: Read> {
    input: R,
    name: String,
    header: StreamHeader,
    /// Bytes read so far.
    offset: u64,
    /// Offset of the record last returned (or being read).
    record_start: u64,
    /// crc32c of every byte read so far.
    crc: u32,
    next_min: u64,
    counts: Trailer,
    buf: Vec<u8>,
    done: bool,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header of the stream `input`; `name` names it in errors.
    pub fn open(mut input: R, name: &str) -> Result<StreamReader<R>> {
        let mut prefix = [0u8; PREFIX_LEN];
        fill(&mut input, name, 0, &mut prefix, "the stream header")?;
        let (version, len) = decode_prefix(&prefix).map_err(|b| corrupt(name, 0, b))?;
        let mut bytes = vec![0u8; len as usize];
        bytes[..PREFIX_LEN].copy_from_slice(&prefix);
        fill(
            &mut input,
            name,
            PREFIX_LEN as u64,
            &mut bytes[PREFIX_LEN..],
            "the rest of the stream header",
        )?;
        if !header_checksum_ok(&bytes) {
            return Err(StreamError::Corrupt {
                stream: name.to_string(),
                offset: u64::from(len) - 4,
                reason: "header checksum mismatch".into(),
            });
        }
        if version != VERSION {
            return Err(StreamError::UnsupportedVersion {
                stream: name.to_string(),
                offset: 8,
                found: version,
                supported: VERSION,
            });
        }
        let header = StreamHeader::decode(&bytes).map_err(|b| corrupt(name, 0, b))?;
        Ok(StreamReader {
            input,
            name: name.to_string(),
            header,
            offset: u64::from(len),
            record_start: u64::from(len),
            crc: crc32c::crc32c(&bytes),
            next_min: 0,
            counts: Trailer::default(),
            buf: Vec::new(),
            done: false,
        })
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// The stream's name, as given to [`StreamReader::open`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Byte offset of the record last returned, for the caller's own error messages.
    pub fn record_start(&self) -> u64 {
        self.record_start
    }

    /// The input, given back (at its end once the last record was read).
    pub fn into_inner(self) -> R {
        self.input
    }

    /// What was read: records and bytes (the trailer's content once the end is reached).
    pub fn counts(&self) -> Trailer {
        self.counts
    }

    /// The next record, verified; `None` once the trailer has been read and checked and
    /// the input has ended.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>> {
        if self.done {
            return Ok(None);
        }
        let start = self.offset;
        self.record_start = start;
        let mut hb = [0u8; RECORD_HEADER_LEN];
        self.read(&mut hb, "a record or the trailer")?;
        let h = RecordHeader::decode(&hb).map_err(|b| corrupt(&self.name, start, b))?;
        let crc_before = self.crc;
        self.crc = crc32c::crc32c_append(self.crc, &hb);
        match h.kind {
            RecordKind::Data => {
                if h.length > MAX_DATA_LEN {
                    return Err(self.corrupt_at(
                        start + 16,
                        format!(
                            "data record of {} bytes is longer than {MAX_DATA_LEN}",
                            h.length
                        ),
                    ));
                }
                self.check_extent(start, &h)?;
                let mut buf = std::mem::take(&mut self.buf);
                buf.resize(h.length as usize, 0);
                let read = self.read(&mut buf, "record data");
                self.buf = buf;
                read?;
                let crc = crc32c::crc32c(&self.buf);
                if crc != h.payload_crc {
                    return Err(self.corrupt_at(
                        start + RECORD_HEADER_LEN as u64,
                        format!(
                            "data checksum mismatch in the record for volume offset {} length {}",
                            h.offset, h.length
                        ),
                    ));
                }
                self.crc = crc32c::crc32c_append(self.crc, &self.buf);
                self.counts.data_records += 1;
                self.counts.data_bytes += h.length;
                Ok(Some(Record::Data {
                    offset: h.offset,
                    data: &self.buf,
                }))
            }
            RecordKind::Zero => {
                if h.payload_crc != 0 {
                    return Err(
                        self.corrupt_at(start + 24, "zero record with a payload checksum".into())
                    );
                }
                self.check_extent(start, &h)?;
                self.counts.zero_records += 1;
                self.counts.zero_bytes += h.length;
                Ok(Some(Record::Zero {
                    offset: h.offset,
                    length: h.length,
                }))
            }
            RecordKind::End => {
                self.end(start, &h, crc_before)?;
                Ok(None)
            }
        }
    }

    /// Checks the end record: its trailer against what was read and what the header
    /// announced, the checksum over the whole stream, and that nothing follows.
    fn end(&mut self, start: u64, h: &RecordHeader, crc_before: u32) -> Result<()> {
        if h.offset != 0 || h.length != TRAILER_LEN as u64 {
            return Err(self.corrupt_at(
                start + 8,
                format!(
                    "end record with offset {} length {} (expected 0 and {TRAILER_LEN})",
                    h.offset, h.length
                ),
            ));
        }
        let payload_at = self.offset;
        let mut tb = [0u8; TRAILER_LEN];
        self.read(&mut tb, "the trailer")?;
        if crc32c::crc32c(&tb) != h.payload_crc {
            return Err(self.corrupt_at(payload_at, "trailer checksum mismatch".into()));
        }
        let t = Trailer::decode(&tb).map_err(|b| corrupt(&self.name, payload_at, b))?;
        if t.stream_crc != crc_before {
            return Err(self.corrupt_at(
                payload_at + 32,
                "checksum over the whole stream does not match (records lost, repeated or reordered)"
                    .into(),
            ));
        }
        let read = Trailer {
            stream_crc: t.stream_crc,
            ..self.counts
        };
        if t != read {
            return Err(self.corrupt_at(
                payload_at,
                format!(
                    "the trailer counts {} data records ({} bytes) and {} zero records ({} bytes) but the stream held {} ({} bytes) and {} ({} bytes)",
                    t.data_records, t.data_bytes, t.zero_records, t.zero_bytes,
                    read.data_records, read.data_bytes, read.zero_records, read.zero_bytes
                ),
            ));
        }
        let a = self.header.totals;
        if a.records != t.data_records + t.zero_records
            || a.data_bytes != t.data_bytes
            || a.zero_bytes != t.zero_bytes
        {
            return Err(self.corrupt_at(
                payload_at,
                format!(
                    "the header announced {} records, {} data bytes and {} zero bytes; the stream held {}, {} and {}",
                    a.records, a.data_bytes, a.zero_bytes,
                    t.data_records + t.zero_records, t.data_bytes, t.zero_bytes
                ),
            ));
        }
        let mut extra = [0u8; 1];
        loop {
            match self.input.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => {
                    return Err(StreamError::TrailingData {
                        stream: self.name.clone(),
                        offset: self.offset,
                    })
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(err) => {
                    return Err(StreamError::Io {
                        stream: self.name.clone(),
                        offset: self.offset,
                        err,
                    })
                }
            }
        }
        self.done = true;
        self.buf = Vec::new();
        Ok(())
    }

    /// Checks a data or zero record's extent: aligned, inside the volume, after the last.
    fn check_extent(&mut self, start: u64, h: &RecordHeader) -> Result<()> {
        let s = &self.header.source;
        let bs = u64::from(s.block_size);
        let reason = if h.length == 0 {
            Some("empty extent".to_string())
        } else if !h.offset.is_multiple_of(bs) || !h.length.is_multiple_of(bs) {
            Some(format!("extent not aligned to the block size {bs}"))
        } else if h
            .offset
            .checked_add(h.length)
            .is_none_or(|e| e > s.volume_size)
        {
            Some(format!(
                "extent reaches past the end of the volume ({} bytes)",
                s.volume_size
            ))
        } else if h.offset < self.next_min {
            Some(format!(
                "extent overlaps or precedes the previous one (which ended at volume offset {})",
                self.next_min
            ))
        } else {
            None
        };
        if let Some(r) = reason {
            return Err(self.corrupt_at(
                start + 8,
                format!(
                    "record for volume offset {} length {}: {r}",
                    h.offset, h.length
                ),
            ));
        }
        self.next_min = h.offset + h.length;
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8], expected: &'static str) -> Result<()> {
        fill(&mut self.input, &self.name, self.offset, buf, expected)?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn corrupt_at(&self, offset: u64, reason: String) -> StreamError {
        StreamError::Corrupt {
            stream: self.name.clone(),
            offset,
            reason,
        }
    }
}

fn corrupt(name: &str, base: u64, b: Bad) -> StreamError {
    StreamError::Corrupt {
        stream: name.to_string(),
        offset: base + b.at,
        reason: b.reason,
    }
}

/// Reads exactly `buf.len()` bytes; an early end is a truncation reported at the exact
/// byte where the input ended.
fn fill<R: Read>(
    input: &mut R,
    name: &str,
    offset: u64,
    buf: &mut [u8],
    expected: &'static str,
) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(StreamError::Truncated {
                    stream: name.to_string(),
                    offset: offset + got as u64,
                    expected,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(err) => {
                return Err(StreamError::Io {
                    stream: name.to_string(),
                    offset: offset + got as u64,
                    err,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::format::{SnapshotRef, StreamSource, Totals};
    use crate::stream::writer::StreamWriter;

    fn header(totals: Totals) -> StreamHeader {
        StreamHeader {
            source: StreamSource {
                volume_id: "v1".into(),
                volume_size: 1 << 20,
                block_size: 512,
                snapshot: SnapshotRef {
                    name: "s".into(),
                    id: 1,
                    created_unix_ms: 5,
                },
                base: None,
            },
            totals,
        }
    }

    fn sample() -> Vec<u8> {
        let totals = Totals {
            records: 3,
            data_bytes: 1536,
            zero_bytes: 512,
        };
        let mut w = StreamWriter::new(Vec::new(), "mem", header(totals)).expect("writer");
        w.data(0, &[7u8; 1024]).expect("data");
        w.zero(1024, 512).expect("zero");
        w.data(4096, &[9u8; 512]).expect("data");
        w.finish().expect("finish").0
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(u64, u64, bool)>> {
        let mut r = StreamReader::open(bytes, "mem")?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(match rec {
                Record::Data { offset, data } => (offset, data.len() as u64, true),
                Record::Zero { offset, length } => (offset, length, false),
            });
        }
        Ok(out)
    }

    #[test]
    fn written_streams_read_back() {
        let recs = read_all(&sample()).expect("read");
        assert_eq!(
            recs,
            vec![(0, 1024, true), (1024, 512, false), (4096, 512, true)]
        );
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        let s = sample();
        for i in 0..s.len() {
            let mut b = s.clone();
            b[i] ^= 0x04;
            assert!(read_all(&b).is_err(), "flip at byte {i} accepted");
            let e = read_all(&s[..i]).expect_err("truncated stream accepted");
            assert!(
                matches!(e, StreamError::Truncated { offset, .. } if offset == i as u64),
                "{e}"
            );
        }
        let mut b = s.clone();
        b.push(0);
        assert!(matches!(
            read_all(&b),
            Err(StreamError::TrailingData { .. })
        ));
    }

    #[test]
    fn the_writer_refuses_what_the_reader_would() {
        let mut w = StreamWriter::new(Vec::new(), "mem", header(Totals::default())).expect("w");
        assert!(w.data(100, &[0; 512]).is_err());
        w.data(512, &[0; 512]).expect("data");
        assert!(w.zero(0, 512).is_err(), "unsorted extent accepted");
        assert!(
            w.zero(1 << 20, 512).is_err(),
            "extent past the end accepted"
        );
        assert!(
            w.finish().is_err(),
            "totals differing from the header accepted"
        );
    }
}
