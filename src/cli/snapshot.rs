//! `snapblk snapshot ...`: take, list, show and delete snapshots, through the daemon when
//! the volume is served (with freeze coordination), or on the folder when it is not.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::output::{outln, print, utc, Format};
use super::size::human;
use super::target::{Target, VolumeArg};
use crate::ctl::protocol::{Command, FreezeMode, NameArgs, SnapshotCreateArgs};
use crate::engine::{SnapshotInfo, Volume};

/// Snapshot commands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot. When the volume is served and a file system is mounted from its
    /// device, the file system is frozen for the cut (application-consistent); otherwise
    /// the snapshot is crash-consistent (every acknowledged write is in it).
    Create(CreateArgs),
    /// List snapshots, oldest first.
    List {
        #[command(flatten)]
        volume: VolumeArg,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        format: Format,
    },
    /// Show one snapshot.
    Show {
        /// The snapshot's name.
        name: String,
        #[command(flatten)]
        volume: VolumeArg,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        format: Format,
    },
    /// Delete a snapshot and give back the space only it held. Refused while the
    /// snapshot is exposed.
    Delete {
        /// The snapshot's name.
        name: String,
        #[command(flatten)]
        volume: VolumeArg,
    },
    /// Serve a snapshot as a read-only block device (/dev/ublkbN) beside the volume's
    /// own, for a backup tool to read or mount, until `snapshot unexpose`. The volume
    /// must be served. To mount a file system that is also mounted from the volume, use
    /// `-o ro` (ext4) or `-o ro,nouuid` (xfs). The device does not survive the daemon.
    Expose {
        /// The snapshot's name.
        name: String,
        #[command(flatten)]
        volume: VolumeArg,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        format: Format,
    },
    /// Remove a snapshot's read-only device (unmount it first: a mounted file system
    /// gets I/O errors once the device is gone).
    Unexpose {
        /// The snapshot's name.
        name: String,
        #[command(flatten)]
        volume: VolumeArg,
    },
}

/// Arguments of `snapshot create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name: letters, digits, '.', '_' and '-' (at most 128). Asking again for an existing
    /// name returns that snapshot.
    pub name: String,
    #[command(flatten)]
    pub volume: VolumeArg,
    /// auto: freeze the file systems mounted from the device, found in every mount
    /// namespace the daemon can see (refused when the device is in use but no mount of it
    /// is found); none: do not freeze (crash-consistent; the only choice for NFS /
    /// ReadWriteMany consumers).
    #[arg(long, value_enum, default_value_t)]
    pub freeze: FreezeMode,
    /// Freeze this mount point (must be mounted from the volume's device) instead of
    /// looking the device's mounts up.
    #[arg(long, value_name = "PATH")]
    pub mount: Option<String>,
    /// Longest time the file system may stay frozen (e.g. 500ms, 10s); past it the file
    /// system is thawed and the snapshot discarded.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub freeze_timeout: Duration,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub format: Format,
}

/// Parses `500ms`, `10s`, `2m` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(
        t.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 10s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Runs a `snapshot` command.
pub fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create(a) => create(a),
        SnapshotCommand::List { volume, format } => {
            let list: Vec<SnapshotInfo> = match volume.resolve()? {
                Target::Daemon(mut c, _) => {
                    serde_json::from_value(c.call(Command::SnapshotList)?["snapshots"].take())?
                }
                Target::Folder(dir) => Volume::open(&dir)?.list_snapshots(),
            };
            print(format, &list, |l| render_list(l))
        }
        SnapshotCommand::Show {
            name,
            volume,
            format,
        } => {
            let info: SnapshotInfo = match volume.resolve()? {
                Target::Daemon(mut c, _) => serde_json::from_value(
                    c.call(Command::SnapshotShow(NameArgs { name }))?["snapshot"].take(),
                )?,
                Target::Folder(dir) => Volume::open(&dir)?.snapshot_info(&name)?,
            };
            print(format, &info, |s| render_list(std::slice::from_ref(s)))
        }
        SnapshotCommand::Delete { name, volume } => {
            match volume.resolve()? {
                Target::Daemon(mut c, _) => {
                    c.call(Command::SnapshotDelete(NameArgs { name: name.clone() }))?;
                }
                Target::Folder(dir) => {
                    let v = Volume::open(&dir)?;
                    v.delete_snapshot(&name)?;
                    v.close()?;
                }
            }
            outln!("snapshot {name} deleted");
            Ok(())
        }
        SnapshotCommand::Expose {
            name,
            volume,
            format,
        } => {
            let mut c = daemon_for(&volume, "expose a snapshot")?;
            let r = c.call(Command::SnapshotExpose(NameArgs { name }))?;
            print(format, &r, |r| {
                format!(
                    "snapshot {} exposed read-only as {}",
                    r["snapshot"].as_str().unwrap_or("?"),
                    r["device"].as_str().unwrap_or("?")
                )
            })
        }
        SnapshotCommand::Unexpose { name, volume } => {
            let mut c = daemon_for(&volume, "unexpose a snapshot")?;
            let r = c.call(Command::SnapshotUnexpose(NameArgs { name }))?;
            outln!(
                "snapshot {} unexposed ({} removed)",
                r["snapshot"].as_str().unwrap_or("?"),
                r["device"].as_str().unwrap_or("?")
            );
            Ok(())
        }
    }
}

/// The daemon serving `volume`; `what` says what needs it, for the error.
fn daemon_for(volume: &VolumeArg, what: &str) -> anyhow::Result<crate::ctl::client::Client> {
    match volume.resolve()? {
        Target::Daemon(c, _) => Ok(c),
        Target::Folder(_) => anyhow::bail!(
            "to {what}, the volume must be served: start `snapblk serve` for {} first",
            volume.volume
        ),
    }
}

fn create(a: CreateArgs) -> anyhow::Result<()> {
    let result: Value = match a.volume.resolve()? {
        Target::Daemon(mut c, _) => c.call(Command::SnapshotCreate(SnapshotCreateArgs {
            name: a.name.clone(),
            freeze: a.freeze,
            mount: a.mount.clone(),
            freeze_timeout_ms: Some(a.freeze_timeout.as_millis().max(1) as u64),
        }))?,
        Target::Folder(dir) => {
            if a.mount.is_some() {
                anyhow::bail!(
                    "--mount needs the volume to be served (no daemon answers for {})",
                    a.volume.volume
                );
            }
            let v = Volume::open(&dir)?;
            let out = match v.snapshot_info(&a.name) {
                Ok(existing) => json!({ "snapshot": existing, "created": false }),
                Err(_) => {
                    let r = v.create_snapshot(&a.name)?;
                    v.merge_after_cut();
                    json!({
                        "snapshot": r.snapshot,
                        "created": true,
                        "consistency": "crash-consistent: the volume is not served, nothing to freeze",
                        "cut_ms": r.total.as_secs_f64() * 1e3,
                    })
                }
            };
            v.close()?;
            out
        }
    };
    print(a.format, &result, render_created)
}

fn render_created(r: &Value) -> String {
    let name = r["snapshot"]["name"].as_str().unwrap_or("?");
    if r["created"] == json!(false) {
        return format!("snapshot {name} already exists (nothing done)");
    }
    let mut s = format!(
        "snapshot {name} taken: {}",
        r["consistency"].as_str().unwrap_or("")
    );
    if let Some(mounts) = r["frozen_mounts"].as_array().filter(|m| !m.is_empty()) {
        let list: Vec<&str> = mounts.iter().filter_map(Value::as_str).collect();
        let ms = |k: &str| r[k].as_f64().unwrap_or(0.0);
        s.push_str(&format!(
            "\nwriters of {} held for {:.1} ms (freeze {:.1} ms, frozen for the cut {:.1} ms; synced before in {:.1} ms)",
            list.join(", "),
            ms("stall_ms"),
            ms("freeze_ms"),
            ms("frozen_ms"),
            ms("sync_ms")
        ));
    }
    s.push_str(&format!(
        "\ncut {:.2} ms",
        r["cut_ms"].as_f64().unwrap_or(0.0)
    ));
    s
}

/// A table of snapshots.
pub fn render_list(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return "no snapshots".into();
    }
    let mut out = format!(
        "{:<6} {:<32} {:<20} {:>10} {:>12}\n",
        "ID", "NAME", "CREATED (UTC)", "SIZE", "OWNED"
    );
    for s in list {
        out.push_str(&format!(
            "{:<6} {:<32} {:<20} {:>10} {:>12}\n",
            s.id,
            s.name,
            utc(s.created_unix_ms),
            human(s.size),
            human(s.owned_bytes)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(
            super::parse_duration("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(super::parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(super::parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(
            super::parse_duration("1.5"),
            Ok(Duration::from_millis(1500))
        );
        for bad in ["", "x", "10h", "-1s", "1e9s"] {
            assert!(super::parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
