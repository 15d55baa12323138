//! Writes a stream record by record to any `Write`: a file, stdout, a socket. Keeps the
//! running checksum and counts for the trailer, and refuses to write anything the reader
//! would refuse (unsorted or unaligned extents, totals that differ from the header's).

use std::io::Write;

use super::error::{Result, StreamError};
use super::format::{RecordHeader, RecordKind, StreamHeader, Trailer, MAX_DATA_LEN, TRAILER_LEN};

/// A stream being written. Call [`StreamWriter::finish`] to write the trailer: a stream
/// dropped before that has no trailer, and every reader refuses it as truncated.
pub struct StreamWriter<W: Write> {
    out: W,
    name: String,
    header: StreamHeader,
    /// Bytes written so far.
    offset: u64,
    /// crc32c of every byte written so far.
    crc: u32,
    /// Lowest volume offset the next record may start at.
    next_min: u64,
    counts: Trailer,
}

impl<W: Write> StreamWriter<W> {
    /// Writes `header` to `out` and returns the writer. `name` names the stream in errors.
    pub fn new(mut out: W, name: &str, header: StreamHeader) -> Result<StreamWriter<W>> {
        let bytes = header.encode().map_err(|reason| {
            StreamError::Invalid(format!("{name}: cannot write this header: {reason}"))
        })?;
        out.write_all(&bytes).map_err(|err| StreamError::Io {
            stream: name.to_string(),
            offset: 0,
            err,
        })?;
        Ok(StreamWriter {
            out,
            name: name.to_string(),
            header,
            offset: bytes.len() as u64,
            crc: crc32c::crc32c(&bytes),
            next_min: 0,
            counts: Trailer::default(),
        })
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Writes a data record: `data` is the volume's content at `offset`.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if len > MAX_DATA_LEN {
            return Err(self.invalid(format!(
                "data record of {len} bytes is longer than {MAX_DATA_LEN}"
            )));
        }
        self.check_extent(offset, len)?;
        let payload_crc = crc32c::crc32c(data);
        self.record(RecordKind::Data, offset, len, payload_crc)?;
        self.put(data)?;
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.counts.data_records += 1;
        self.counts.data_bytes += len;
        Ok(())
    }

    /// Writes a zero record: `[offset, offset+length)` reads as zeros.
    pub fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        self.check_extent(offset, length)?;
        self.record(RecordKind::Zero, offset, length, 0)?;
        self.counts.zero_records += 1;
        self.counts.zero_bytes += length;
        Ok(())
    }

    /// Writes the end record with the trailer, flushes, and returns the output, the
    /// trailer and the stream's size in bytes. Refuses if the records written differ from
    /// what the header announced.
    pub fn finish(mut self) -> Result<(W, Trailer, u64)> {
        let t = &self.header.totals;
        let c = &self.counts;
        if c.data_records + c.zero_records != t.records
            || c.data_bytes != t.data_bytes
            || c.zero_bytes != t.zero_bytes
        {
            return Err(self.invalid(format!(
                "wrote {} records, {} data bytes, {} zero bytes but the header announced {} records, {} data bytes, {} zero bytes",
                c.data_records + c.zero_records,
                c.data_bytes,
                c.zero_bytes,
                t.records,
                t.data_bytes,
                t.zero_bytes
            )));
        }
        let trailer = Trailer {
            stream_crc: self.crc,
            ..self.counts
        };
        let payload = trailer.encode();
        let crc = crc32c::crc32c(&payload);
        self.record(RecordKind::End, 0, TRAILER_LEN as u64, crc)?;
        self.put(&payload)?;
        let at = self.offset;
        self.out.flush().map_err(|err| StreamError::Io {
            stream: self.name.clone(),
            offset: at,
            err,
        })?;
        Ok((self.out, trailer, at))
    }

    fn check_extent(&mut self, offset: u64, length: u64) -> Result<()> {
        let s = &self.header.source;
        let bs = u64::from(s.block_size);
        let end = offset.checked_add(length);
        let ok = length > 0
            && offset.is_multiple_of(bs)
            && length.is_multiple_of(bs)
            && offset >= self.next_min
            && end.is_some_and(|e| e <= s.volume_size);
        if !ok {
            return Err(self.invalid(format!(
                "extent at {offset} length {length} is empty, unaligned, unsorted or past the end"
            )));
        }
        self.next_min = offset + length;
        Ok(())
    }

    fn record(
        &mut self,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload_crc: u32,
    ) -> Result<()> {
        let h = RecordHeader {
            kind,
            offset,
            length,
            payload_crc,
        }
        .encode();
        self.put(&h)?;
        self.crc = crc32c::crc32c_append(self.crc, &h);
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|err| StreamError::Io {
            stream: self.name.clone(),
            offset: self.offset,
            err,
        })?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn invalid(&self, reason: String) -> StreamError {
        StreamError::Invalid(format!("{}: at byte {}: {reason}", self.name, self.offset))
    }
}
