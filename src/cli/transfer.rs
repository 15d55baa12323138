//! `snapblk export` and `snapblk import`: snapshots leave the node as a stream and come
//! back as a new volume. Argument parsing, the progress bar and the summary line; the
//! work is in [`crate::stream`].

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::size::human;
use crate::engine::Volume;
use crate::stream::{
    export_snapshot, import_streams, sink::OutputFile, ExportSummary, ImportSummary, Progress,
    StreamInput,
};

/// Arguments of `snapblk export`.
///
/// Writes snapshot SNAPSHOT of the volume as a stream: every block that holds data, or
/// with --since only the blocks written or discarded after the base snapshot (discarded
/// ones as zero extents). The stream is versioned and checksummed (docs/stream-format.md).
/// The volume must not be served meanwhile (its folder is locked). A progress bar shows
/// on stderr when it is a terminal; a one-line summary goes to stderr at the end.
#[derive(Debug, Args)]
#[command(after_help = "\
A full stream holds every block of the snapshot that holds data; with --since, only the
blocks written or discarded after the base snapshot (discarded ones as zero extents).
The stream is versioned and checksummed (docs/stream-format.md). The volume must not be
served meanwhile. A progress bar shows on stderr when it is a terminal; a one-line
summary goes to stderr at the end (stdout may carry the stream).

Examples:
  snapblk export /var/lib/snapblk/vol1 monday -o monday.snapblk
  snapblk export /var/lib/snapblk/vol1 tuesday --since monday -o tuesday.snapblk
  snapblk export /var/lib/snapblk/vol1 tuesday --since monday -o - | ssh backup 'cat > tuesday.snapblk'")]
pub struct ExportArgs {
    /// The volume's folder.
    pub dir: PathBuf,
    /// The snapshot to export.
    pub snapshot: String,
    /// Export only what changed after this older snapshot (an incremental stream).
    #[arg(long, value_name = "BASE")]
    pub since: Option<String>,
    /// Where to write the stream: a file (replaced only once the stream is complete), or
    /// `-` for stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE|-")]
    pub output: PathBuf,
}

/// Arguments of `snapblk import`.
///
/// Builds a new volume from a full stream and any chain of incremental streams after it,
/// in order, taking a snapshot named like the source's after each stream. Refuses a
/// damaged, truncated or out-of-order stream; the new folder then is not created. A
/// progress bar shows on stderr when it is a terminal; a summary line is printed at the end.
#[derive(Debug, Args)]
#[command(after_help = "\
Streams are applied in the order given: a full stream, then incrementals each based on
the snapshot of the one before; a snapshot named like the source's is taken after each.
A damaged, truncated or out-of-order stream is refused and the new folder is not
created. A progress bar shows on stderr when it is a terminal; a summary line is printed
at the end.

Examples:
  snapblk import /var/lib/snapblk/vol1-restored monday.snapblk tuesday.snapblk
  ssh backup 'cat tuesday.snapblk' | snapblk import /var/lib/snapblk/vol1-restored monday.snapblk -")]
pub struct ImportArgs {
    /// Folder of the new volume (must not exist).
    pub new_dir: PathBuf,
    /// Stream files, full first, then incrementals in order; `-` reads one from stdin.
    #[arg(required = true, value_name = "STREAM")]
    pub streams: Vec<PathBuf>,
}

/// Runs `snapblk export`.
pub fn run_export(a: ExportArgs) -> anyhow::Result<()> {
    let to_stdout = a.output.as_os_str() == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        bail!("refusing to write a binary stream to a terminal: redirect stdout or use -o FILE");
    }
    let t0 = Instant::now();
    let volume = Volume::open(&a.dir)?;
    let bar = Bar::default();
    let since = a.since.as_deref();
    let (mut summary, dest) = if to_stdout {
        let out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
        let (mut out, summary) = export_snapshot(&volume, &a.snapshot, since, out, "stdout", &bar)?;
        out.flush().context("stdout")?;
        (summary, "stdout".to_string())
    } else {
        let file = OutputFile::create(&a.output)?;
        let name = file.name();
        let (file, summary) = export_snapshot(&volume, &a.snapshot, since, file, &name, &bar)?;
        file.commit()?;
        (summary, name)
    };
    // The time the user waited, including the final sync of the file.
    summary.elapsed = t0.elapsed();
    eprintln!("{}", export_line(&summary, volume.name(), &dest));
    Ok(volume.close()?)
}

/// Runs `snapblk import`.
pub fn run_import(a: ImportArgs) -> anyhow::Result<()> {
    if a.streams.iter().filter(|p| p.as_os_str() == "-").count() > 1 {
        bail!("stdin (-) can be given only once");
    }
    let mut inputs = Vec::with_capacity(a.streams.len());
    for p in &a.streams {
        if p.as_os_str() == "-" {
            inputs.push(StreamInput::new("stdin", std::io::stdin().lock()));
        } else {
            let f = File::open(p).with_context(|| p.display().to_string())?;
            inputs.push(StreamInput::new(p.display().to_string(), f));
        }
    }
    let bar = Bar::default();
    let summary = import_streams(&a.new_dir, inputs, &bar)?;
    println!("{}", import_line(&summary));
    Ok(())
}

/// `exported snapshot S of V (incremental since B) to F: ...`.
fn export_line(s: &ExportSummary, volume: &str, dest: &str) -> String {
    let t = &s.trailer;
    let kind = match &s.source.base {
        Some(b) => format!("incremental since {}", b.name),
        None => "full".to_string(),
    };
    format!(
        "exported snapshot {} of {volume} ({kind}) to {dest}: {} extents ({} data, {} zero), {} data, {} zeroed, {} stream in {}",
        s.source.snapshot.name,
        t.data_records + t.zero_records,
        t.data_records,
        t.zero_records,
        human(t.data_bytes),
        human(t.zero_bytes),
        human(s.stream_bytes),
        timing(s.stream_bytes, s.elapsed)
    )
}

/// `imported N streams (snapshots a, b) into DIR: ...`.
fn import_line(s: &ImportSummary) -> String {
    format!(
        "imported {} stream{} (snapshot{} {}) into {}: {} extents ({} data, {} zero), {} data, {} zeroed, {} read in {}",
        s.snapshots.len(),
        if s.snapshots.len() == 1 { "" } else { "s" },
        if s.snapshots.len() == 1 { "" } else { "s" },
        s.snapshots.join(", "),
        s.target.display(),
        s.data_records + s.zero_records,
        s.data_records,
        s.zero_records,
        human(s.data_bytes),
        human(s.zero_bytes),
        human(s.stream_bytes),
        timing(s.stream_bytes, s.elapsed)
    )
}

/// `1.23 s (456.7 MiB/s)`.
fn timing(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        human((bytes as f64 / secs) as u64)
    } else {
        human(bytes)
    };
    format!("{secs:.2} s ({rate}/s)")
}

/// A progress bar on stderr, drawn only when stderr is a terminal.
#[derive(Default)]
struct Bar(std::cell::OnceCell<ProgressBar>);

impl Progress for Bar {
    fn start(&self, total_bytes: u64) {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40.cyan/blue} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style);
        }
        let _ = self.0.set(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = self.0.get() {
            b.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.0.get() {
            b.finish_and_clear();
        }
    }
}
