//! The command line: argument parsing only; each command calls into the layers below.

pub mod csi;
pub mod ctl;
pub mod output;
pub mod serve;
pub mod size;
pub mod snapshot;
pub mod target;
pub mod transfer;
pub mod volume;

use clap::{Parser, Subcommand};

/// snapblk serves volumes as Linux ublk block devices (/dev/ublkbN) with instant,
/// consistent point-in-time snapshots.
///
/// A volume is a folder of files: create one with `snapblk volume create`, serve it with
/// `snapblk serve`, take snapshots, clone them into new volumes. Set RUST_LOG (for example
/// RUST_LOG=debug) for more detailed logs on stderr.
#[derive(Debug, Parser)]
#[command(name = "snapblk", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect and clone volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Take, list, show and delete snapshots (through the daemon when served).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Show a volume's state: device, data mode, freeze, layers, snapshots, space.
    Status(ctl::StatusArgs),
    /// Freeze the file system on a served volume while this command runs (tests, emergencies).
    Freeze(ctl::FreezeCmdArgs),
    /// Thaw a file system frozen through the daemon.
    Thaw(ctl::ThawArgs),
    /// Internal: the watchdog that thaws a frozen file system if the daemon dies.
    #[command(hide = true)]
    FreezeWatchdog(ctl::WatchdogArgs),
    /// Serve a volume as a ublk block device until SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
    /// Write a snapshot (or what changed since an older one) as a backup stream.
    Export(transfer::ExportArgs),
    /// Build a new volume from a full backup stream and the incrementals after it.
    Import(transfer::ImportArgs),
    /// Run the CSI driver for Kubernetes: controller, node plugin, or both.
    #[command(subcommand)]
    Csi(csi::CsiCommand),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Volume(c) => volume::run(c),
        Command::Snapshot(c) => snapshot::run(c),
        Command::Status(a) => ctl::status(a),
        Command::Freeze(a) => ctl::freeze(a),
        Command::Thaw(a) => ctl::thaw(a),
        Command::FreezeWatchdog(a) => ctl::watchdog(a),
        Command::Serve(a) => serve::run(a),
        Command::Export(a) => transfer::run_export(a),
        Command::Import(a) => transfer::run_import(a),
        Command::Csi(c) => csi::run(c),
    }
}
