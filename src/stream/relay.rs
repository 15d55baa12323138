//! Passing a stream on while checking it: the command line receives an export from the
//! daemon over the control socket and writes it to a file or stdout. Every record and
//! the trailer are verified on the way, so an export that the daemon could not finish
//! (an I/O error, a killed daemon) ends in an error here, never in a file that only
//! looks complete.

use std::io::{self, Read, Write};
use std::time::Instant;

use super::error::Result;
use super::export::ExportSummary;
use super::progress::Progress;
use super::reader::{Record, StreamReader};

/// A reader that copies every byte it reads to `out`.
struct Tee<R, W> {
    input: R,
    out: W,
    out_name: String,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.out
            .write_all(&buf[..n])
            .map_err(|e| io::Error::new(e.kind(), format!("writing to {}: {e}", self.out_name)))?;
        Ok(n)
    }
}

/// Reads the stream `input` (named `name` in errors), writes the same bytes to `out`
/// (named `out_name`), and checks every record and the trailer. Returns `out` and what
/// the stream held; on error `out` may hold a partial stream, which no import accepts.
pub fn relay_stream<R: Read, W: Write>(
    input: R,
    out: W,
    name: &str,
    out_name: &str,
    progress: &dyn Progress,
) -> Result<(W, ExportSummary)> {
    let t0 = Instant::now();
    let tee = Tee {
        input,
        out,
        out_name: out_name.to_string(),
    };
    let mut reader = StreamReader::open(tee, name)?;
    progress.start(reader.header().totals.data_bytes);
    let result = (|| {
        while let Some(r) = reader.next_record()? {
            if let Record::Data { data, .. } = r {
                progress.advance(data.len() as u64);
            }
        }
        Ok(())
    })();
    progress.finish();
    result?;
    let summary = ExportSummary {
        source: reader.header().source.clone(),
        trailer: reader.counts(),
        stream_bytes: reader.position(),
        elapsed: t0.elapsed(),
    };
    Ok((reader.into_inner().out, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CreateOptions, Volume};
    use crate::stream::{export_snapshot, NoProgress, StreamError};

    fn stream() -> (tempfile::TempDir, Vec<u8>) {
        let tmp = tempfile::tempdir().expect("tmp");
        let v = Volume::create(
            &tmp.path().join("v"),
            &CreateOptions {
                size: 4 << 20,
                block_size: 4096,
            },
        )
        .expect("volume");
        for i in 0..16u64 {
            v.write(i * 65536, &[i as u8 + 1; 8192], false)
                .expect("write");
        }
        v.create_snapshot("s").expect("snapshot");
        let (bytes, _) =
            export_snapshot(&v, "s", None, Vec::new(), "test", &NoProgress).expect("export");
        (tmp, bytes)
    }

    #[test]
    fn relays_a_whole_stream_byte_for_byte() {
        let (_tmp, bytes) = stream();
        let (out, summary) =
            relay_stream(&bytes[..], Vec::new(), "in", "out", &NoProgress).expect("relay");
        assert_eq!(out, bytes);
        assert_eq!(summary.stream_bytes, bytes.len() as u64);
        assert_eq!(summary.trailer.data_records, 16);
        assert_eq!(summary.source.snapshot.name, "s");
    }

    #[test]
    fn a_cut_or_damaged_stream_is_an_error() {
        let (_tmp, bytes) = stream();
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            let r = relay_stream(&bytes[..cut], Vec::new(), "in", "out", &NoProgress);
            assert!(r.is_err(), "a stream cut at {cut} passed");
        }
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(relay_stream(&bad[..], Vec::new(), "in", "out", &NoProgress).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            relay_stream(&longer[..], Vec::new(), "in", "out", &NoProgress),
            Err(StreamError::TrailingData { .. })
        ));
    }

    #[test]
    fn a_failing_output_is_an_error() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (_tmp, bytes) = stream();
        let e = relay_stream(&bytes[..], Full, "in", "backup.snapblk", &NoProgress)
            .err()
            .expect("error");
        assert!(e.to_string().contains("writing to backup.snapblk"), "{e}");
    }
}
