//! `snapblk export` and `snapblk import`: snapshots leave the node as a stream and come
//! back as a new volume. Argument parsing, the progress bar and the summary line; the
//! work is in [`crate::stream`].

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::outln;
use super::size::human;
use super::target::{Target, VolumeArg};
use crate::ctl::protocol::ExportArgs as CtlExportArgs;
use crate::engine::Volume;
use crate::stream::{
    export_snapshot, import_streams, relay_stream, sink::OutputFile, ExportSummary, ImportSummary,
    Progress, StreamInput,
};

/// Arguments of `snapblk export`.
///
/// Writes snapshot SNAPSHOT of the volume as a stream: every block that holds data, or
/// with --since only the blocks written or discarded after the base snapshot (discarded
/// ones as zero extents). The stream is versioned and checksummed (docs/stream-format.md).
/// A served volume is exported by its daemon (over the control socket, checked on
/// arrival); one that is not served is read from its folder. A progress bar shows on
/// stderr when it is a terminal; a one-line summary goes to stderr at the end.
#[derive(Debug, Args)]
#[command(after_help = "\
A full stream holds every block of the snapshot that holds data; with --since, only the
blocks written or discarded after the base snapshot (discarded ones as zero extents).
The stream is versioned and checksummed (docs/stream-format.md). A served volume is
exported by its daemon while it keeps serving (the stream comes over the control socket
and is checked record by record on arrival; the snapshots it reads cannot be deleted
meanwhile); a volume that is not served is read from its folder. A progress bar shows
on stderr when it is a terminal; a one-line summary goes to stderr at the end (stdout
may carry the stream).

Examples:
  snapblk export /var/lib/snapblk/vol1 monday -o monday.snapblk
  snapblk export vol1 monday -o monday.snapblk               # served: through its daemon
  snapblk export /var/lib/snapblk/vol1 tuesday --since monday -o tuesday.snapblk
  snapblk export /var/lib/snapblk/vol1 tuesday --since monday -o - | ssh backup 'cat > tuesday.snapblk'")]
pub struct ExportArgs {
    /// The volume: its folder, or the name of a served volume (its folder's name).
    pub volume: String,
    /// The daemon's control socket [default: /run/snapblk/<volume name>.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
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
    let target = VolumeArg {
        volume: a.volume.clone(),
        socket: a.socket.clone(),
    };
    let bar = Bar::default();
    let (mut summary, dest, volume_name) = match target.resolve()? {
        Target::Daemon(client, sock) => {
            let (_head, input) = client.export(CtlExportArgs {
                snapshot: a.snapshot.clone(),
                since: a.since.clone(),
            })?;
            let from = format!("the stream from the daemon at {}", sock.display());
            let (summary, dest) = to_output(to_stdout, &a.output, |out, name| {
                Ok(relay_stream(input, out, &from, name, &bar)?.1)
            })?;
            (summary, dest, target.name())
        }
        Target::Folder(dir) => {
            let volume = Volume::open(&dir)?;
            let since = a.since.as_deref();
            let (summary, dest) = to_output(to_stdout, &a.output, |out, name| {
                Ok(export_snapshot(&volume, &a.snapshot, since, out, name, &bar)?.1)
            })?;
            let name = volume.name().to_string();
            volume.close()?;
            (summary, dest, name)
        }
    };
    // The time the user waited, including the final sync of the file.
    summary.elapsed = t0.elapsed();
    eprintln!("{}", export_line(&summary, &volume_name, &dest));
    Ok(())
}

/// Runs `produce` into stdout (`to_stdout`) or into the file `output`, which appears
/// only once complete; returns what `produce` returned and the output's name.
fn to_output<P>(
    to_stdout: bool,
    output: &Path,
    produce: P,
) -> anyhow::Result<(ExportSummary, String)>
where
    P: FnOnce(&mut dyn Write, &str) -> anyhow::Result<ExportSummary>,
{
    if to_stdout {
        let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
        let summary = produce(&mut out, "stdout")?;
        out.flush().context("stdout")?;
        Ok((summary, "stdout".to_string()))
    } else {
        let mut file = OutputFile::create(output)?;
        let name = file.name();
        let summary = produce(&mut file, &name)?;
        file.commit()?;
        Ok((summary, name))
    }
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
    outln!("{}", import_line(&summary));
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
