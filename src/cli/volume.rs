//! `snapblk volume ...`: create, inspect and clone volumes on disk.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::output::{outln, print, utc, Format};
use super::size::{human, parse_size};
use super::target::{resolve, Target};
use crate::ctl::protocol::{CloneArgs, Command, ResizeArgs};
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
    ///
    /// Works whether or not the source is served (through its daemon when it is). The
    /// new volume has the snapshot's size.
    Clone {
        /// The source volume: its folder, or the name of a served volume.
        source: String,
        /// The snapshot to restore.
        snapshot: String,
        /// Folder of the new volume (must not exist).
        new_dir: PathBuf,
        /// The source daemon's control socket [default: /run/snapblk/<volume name>.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Grow a volume (through its daemon when it is served).
    ///
    /// Served, the daemon grows the volume, then tells the kernel the device's new size
    /// (Linux 6.16+, UBLK_F_UPDATE_SIZE; on older kernels the request is refused and
    /// nothing changes: stop the daemon, grow the folder, serve it again). Then grow the
    /// file system on the device (resize2fs, xfs_growfs). Snapshots keep their size.
    /// Volumes never shrink.
    #[command(
        after_help = "Examples:\n  snapblk volume resize /var/lib/snapblk/vol1 --size 20G   # not served\n  snapblk volume resize vol1 --size 20G                    # served: through its daemon"
    )]
    Resize(ResizeCmdArgs),
}

/// Arguments of `volume resize`.
#[derive(Debug, Args)]
pub struct ResizeCmdArgs {
    /// The volume: its folder, or the name of a served volume (its folder's name).
    pub volume: String,
    /// New size, e.g. 20G (powers of 1024): a multiple of the block size, not smaller
    /// than the volume (the same size changes nothing).
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// The daemon's control socket [default: /run/snapblk/<volume name>.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
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
            outln!(
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
            source,
            snapshot,
            new_dir,
            socket,
        } => match resolve(&source, socket.as_deref())? {
            Target::Daemon(mut c, _) => {
                // The daemon does not share our working folder.
                let dir = std::path::absolute(&new_dir)?;
                let r = c.call(Command::SnapshotClone(CloneArgs {
                    name: snapshot.clone(),
                    dir: dir.to_string_lossy().into_owned(),
                }))?;
                outln!(
                    "cloned snapshot {snapshot} of {source} (served) into volume {} ({})",
                    r["volume_id"].as_str().unwrap_or("?"),
                    dir.display()
                );
                Ok(())
            }
            Target::Folder(dir) => {
                let v = Volume::open(&dir)?;
                let c = v.clone_snapshot(&snapshot, &new_dir)?;
                outln!(
                    "cloned snapshot {snapshot} of {} into volume {} ({})",
                    v.name(),
                    c.name(),
                    new_dir.display()
                );
                Ok(c.close()?)
            }
        },
        VolumeCommand::Resize(a) => resize(a),
    }
}

fn resize(a: ResizeCmdArgs) -> anyhow::Result<()> {
    match resolve(&a.volume, a.socket.as_deref())? {
        Target::Daemon(mut c, _) => {
            let r = c.call(Command::VolumeResize(ResizeArgs { size: a.size }))?;
            let resized = r["device_resized"].as_bool().unwrap_or(false);
            outln!(
                "volume {} is {} ({} bytes){}",
                a.volume,
                human(a.size),
                a.size,
                if resized {
                    "; the device has grown: grow the file system on it now"
                } else {
                    ""
                }
            );
        }
        Target::Folder(dir) => {
            let v = Volume::open(&dir)?;
            let old = v.size();
            v.resize(a.size)?;
            v.close()?;
            outln!(
                "volume {} grew from {} to {} ({} bytes)",
                dir.display(),
                human(old),
                human(a.size),
                a.size
            );
        }
    }
    Ok(())
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
    if s.slotted_head {
        out.push_str(&format!(
            "reserved    {} written ahead for first writes (over-allocation; at most {})\n",
            human(s.reserved_bytes),
            human(crate::engine::head_reserve_for(s.size)),
        ));
    }
    if let Some(o) = &s.origin {
        out.push_str(&format!("cloned from {o}\n"));
    }
    out.push_str(&render_disk(&s.disk));
    if let Some(why) = &s.flush_failure {
        out.push_str(&format!(
            "FLUSH FAILED {why}\n            every flush fails until the volume is reopened (restart its daemon)\n"
        ));
    }
    out
}

/// The `disk` lines of a status: the folder's file system, full or failing.
fn render_disk(d: &crate::engine::DiskStatus) -> String {
    let mut out = match &d.full {
        Some(f) => format!(
            "disk        FULL (ENOSPC since {}, {} request{} refused), {} free of {}\n",
            utc(f.since_unix_ms),
            f.refused,
            if f.refused == 1 { "" } else { "s" },
            human(d.free_bytes),
            human(d.total_bytes),
        ),
        None => format!(
            "disk        ok, {} free of {}\n",
            human(d.free_bytes),
            human(d.total_bytes)
        ),
    };
    if d.io_errors > 0 {
        out.push_str(&format!(
            "disk errors {} (last at {}: {})\n",
            d.io_errors,
            d.last_error_unix_ms.map_or_else(String::new, utc),
            d.last_error.as_deref().unwrap_or("?"),
        ));
    }
    out
}
