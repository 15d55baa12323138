//! Where an export writes to a file: the file appears whole or keeps its old content.
//! A regular file (or a new one) is written as `<file>.partial` beside it, synced, then
//! renamed over; an export that fails midway removes the partial file, so a good older
//! backup of the same name is never replaced by half a stream. Special files (a FIFO, a
//! tape, /dev/null) are written in place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::error::{Result, StreamError};

/// Buffer between the exporter's records and the file.
const BUFFER: usize = 1 << 20;

/// An output file being written; [`OutputFile::commit`] makes it the real one.
pub struct OutputFile {
    writer: BufWriter<File>,
    path: PathBuf,
    /// The partial file, or None when writing in place.
    partial: Option<PathBuf>,
    committed: bool,
}

fn err_at(path: &Path) -> impl FnOnce(io::Error) -> StreamError + '_ {
    move |err| StreamError::Io {
        stream: path.display().to_string(),
        offset: 0,
        err,
    }
}

impl OutputFile {
    /// Opens `path` for a new stream.
    pub fn create(path: &Path) -> Result<OutputFile> {
        let special = fs::metadata(path).is_ok_and(|m| !m.is_file());
        let (file, partial) = if special {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(err_at(path))?;
            (f, None)
        } else {
            let mut name = path.as_os_str().to_os_string();
            name.push(".partial");
            let partial = PathBuf::from(name);
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&partial)
                .map_err(err_at(&partial))?;
            (f, Some(partial))
        };
        Ok(OutputFile {
            writer: BufWriter::with_capacity(BUFFER, file),
            path: path.to_path_buf(),
            partial,
            committed: false,
        })
    }

    /// The file's name, for messages.
    pub fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// Flushes and syncs the stream, then puts it in place.
    pub fn commit(mut self) -> Result<()> {
        let path = self.path.clone();
        self.writer.flush().map_err(err_at(&path))?;
        let file = self.writer.get_ref();
        if let Some(partial) = &self.partial {
            file.sync_all().map_err(err_at(partial))?;
            fs::rename(partial, &path).map_err(err_at(&path))?;
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| Path::new("."));
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err_at(dir))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.writer.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.committed {
            if let Some(p) = &self.partial {
                let _ = fs::remove_file(p);
            }
        }
    }
}
