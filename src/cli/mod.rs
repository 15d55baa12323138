//! The command line: argument parsing only; each command calls into the layers below.

pub mod output;
pub mod serve;
pub mod size;
pub mod snapshot;
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
    /// Take, list, show and delete snapshots of a volume that is not being served.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Serve a volume as a ublk block device until SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Volume(c) => volume::run(c),
        Command::Snapshot(c) => snapshot::run(c),
        Command::Serve(a) => serve::run(a),
    }
}
