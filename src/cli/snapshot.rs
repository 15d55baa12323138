//! `snapblk snapshot ...`: snapshots of a volume that is not being served.

use std::path::PathBuf;

use clap::Subcommand;

use super::output::{print, Format};
use super::size::human;
use crate::engine::{SnapshotInfo, Volume};

/// Snapshot commands. They open the volume folder directly, so the volume must not be
/// served at the same time (the folder is locked while served).
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot (crash-consistent: every acknowledged write is in it).
    Create {
        /// The volume's folder.
        #[arg(long)]
        volume: PathBuf,
        /// Name: letters, digits, '.', '_' and '-'.
        name: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        format: Format,
    },
    /// List snapshots, oldest first.
    List {
        #[arg(long)]
        volume: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        format: Format,
    },
    /// Show one snapshot.
    Show {
        #[arg(long)]
        volume: PathBuf,
        name: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        format: Format,
    },
    /// Delete a snapshot and give back the space only it held.
    Delete {
        #[arg(long)]
        volume: PathBuf,
        name: String,
    },
}

/// Runs a `snapshot` command.
pub fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create {
            volume,
            name,
            format,
        } => {
            let v = Volume::open(&volume)?;
            let report = v.create_snapshot(&name)?;
            print(format, &report, |r| {
                format!(
                    "snapshot {} taken (crash-consistent; cut {:.3} ms)",
                    r.snapshot.name,
                    r.total.as_secs_f64() * 1e3
                )
            })?;
            Ok(v.close()?)
        }
        SnapshotCommand::List { volume, format } => {
            let v = Volume::open(&volume)?;
            print(format, &v.list_snapshots(), |list| render_list(list))
        }
        SnapshotCommand::Show {
            volume,
            name,
            format,
        } => {
            let v = Volume::open(&volume)?;
            let info = v.snapshot_info(&name)?;
            print(format, &info, |s| render_list(std::slice::from_ref(s)))
        }
        SnapshotCommand::Delete { volume, name } => {
            let v = Volume::open(&volume)?;
            v.delete_snapshot(&name)?;
            println!("snapshot {name} deleted");
            Ok(v.close()?)
        }
    }
}

/// A table of snapshots.
pub fn render_list(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return "no snapshots".into();
    }
    let mut out = format!(
        "{:<6} {:<32} {:<24} {:>10} {:>12}\n",
        "ID", "NAME", "CREATED (UTC)", "SIZE", "OWNED"
    );
    for s in list {
        out.push_str(&format!(
            "{:<6} {:<32} {:<24} {:>10} {:>12}\n",
            s.id,
            s.name,
            utc(s.created_unix_ms),
            human(s.size),
            human(s.owned_bytes)
        ));
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for a Unix time in milliseconds.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_795_300_000_000), "2026-11-21 22:26:40");
    }
}
