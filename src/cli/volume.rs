//! `snapblk volume ...`: create, inspect and clone volumes on disk.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::output::{print, Format};
use super::size::{human, parse_size};
use crate::engine::{CreateOptions, Volume, VolumeStatus};

/// Commands on volume folders.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a new, empty volume in a folder (the folder must not exist or be empty).
    Create(CreateArgs),
    /// Show a volume's size, layers, snapshots and space used (the volume must not be served).
    Status {
        /// The volume's folder.
        dir: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        format: Format,
    },
    /// Restore a snapshot into a new, independent volume, without copying data.
    Clone {
        /// The source volume's folder.
        dir: PathBuf,
        /// The snapshot to restore.
        snapshot: String,
        /// Folder of the new volume (must not exist).
        new_dir: PathBuf,
    },
}

/// Arguments of `volume create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Folder for the volume's files.
    pub dir: PathBuf,
    /// Size, e.g. 256M, 10G, 1T (powers of 1024); a multiple of the block size.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Logical block size of the device: 4096 or 512. Fixed for the volume's life.
    #[arg(long, default_value_t = 4096)]
    pub block_size: u32,
}

/// Runs a `volume` command.
pub fn run(cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create(a) => {
            let v = Volume::create(
                &a.dir,
                &CreateOptions {
                    size: a.size,
                    block_size: a.block_size,
                },
            )?;
            println!(
                "created volume {} ({}, {}-byte blocks) in {}",
                v.name(),
                human(v.size()),
                v.block_size(),
                a.dir.display()
            );
            Ok(v.close()?)
        }
        VolumeCommand::Status { dir, format } => {
            let v = Volume::open(&dir)?;
            print(format, &v.status(), render_status)
        }
        VolumeCommand::Clone {
            dir,
            snapshot,
            new_dir,
        } => {
            let v = Volume::open(&dir)?;
            let c = v.clone_snapshot(&snapshot, &new_dir)?;
            println!(
                "cloned snapshot {snapshot} of {} into volume {} ({})",
                v.name(),
                c.name(),
                new_dir.display()
            );
            Ok(())
        }
    }
}

/// Human text for a volume's status.
pub fn render_status(s: &VolumeStatus) -> String {
    let mut out = format!(
        "volume      {}\nid          {}\nsize        {} ({} bytes), {}-byte blocks\nsnapshots   {}\nlayers      {}{}\nhead data   {}\nstored data {}\nmap memory  {}\n",
        s.name,
        s.volume_id,
        human(s.size),
        s.size,
        s.block_size,
        s.snapshots,
        s.layers,
        if s.pending_merges > 0 {
            format!(" ({} waiting to be merged)", s.pending_merges)
        } else {
            String::new()
        },
        human(s.head_bytes),
        human(s.stored_bytes),
        human(s.map_bytes),
    );
    if let Some(o) = &s.origin {
        out.push_str(&format!("cloned from {o}\n"));
    }
    out
}
