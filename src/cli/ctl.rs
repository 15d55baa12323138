//! `snapblk status`, `snapblk freeze`, `snapblk thaw`: talking to a serving daemon, and the
//! hidden `freeze-watchdog` the daemon runs while a file system is frozen.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use super::output::{outln, print, Format};
use super::snapshot::parse_duration;
use super::target::{Target, VolumeArg};
use super::volume::render_status;
use crate::ctl::protocol::{Command, FreezeArgs};
use crate::engine::{Volume, VolumeStatus};

/// Arguments of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub volume: VolumeArg,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub format: Format,
}

/// Arguments of `freeze`.
#[derive(Debug, Args)]
pub struct FreezeCmdArgs {
    #[command(flatten)]
    pub volume: VolumeArg,
    /// The mount point to freeze [default: every file system mounted from the device].
    #[arg(long, value_name = "PATH")]
    pub mount: Option<String>,
    /// Thaw automatically after this long (at most 5m).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub timeout: Duration,
}

/// Arguments of `thaw`.
#[derive(Debug, Args)]
pub struct ThawArgs {
    #[command(flatten)]
    pub volume: VolumeArg,
}

/// Arguments of the hidden `freeze-watchdog`.
#[derive(Debug, Args)]
pub struct WatchdogArgs {
    #[arg(long)]
    pub timeout_ms: u64,
    pub mounts: Vec<PathBuf>,
}

/// `snapblk status`: the daemon's view (device, volume, freeze) or the folder's.
pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    match a.volume.resolve()? {
        Target::Daemon(mut c, sock) => {
            let v = c.call(Command::Status)?;
            print(a.format, &v, |v| {
                let mut s = String::new();
                if let Some(d) = v.get("device").filter(|d| !d.is_null()) {
                    s.push_str(&format!(
                        "device      {} ({}, {}:{})\n",
                        d["path"].as_str().unwrap_or("?"),
                        d["mode"].as_str().unwrap_or("?"),
                        d["major"],
                        d["minor"]
                    ));
                }
                s.push_str(&format!("socket      {}\n", sock.display()));
                if let Some(f) = v.get("frozen").and_then(Value::as_array) {
                    s.push_str(&format!(
                        "frozen      {}\n",
                        f.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                match serde_json::from_value::<VolumeStatus>(v["volume"].clone()) {
                    Ok(st) => s.push_str(&render_status(&st)),
                    Err(_) => s.push_str(&v["volume"].to_string()),
                }
                s
            })
        }
        Target::Folder(dir) => {
            let v = Volume::open(&dir)?;
            outln!("(not served)");
            print(a.format, &v.status(), render_status)
        }
    }
}

/// `snapblk freeze`: freezes through the daemon and holds the freeze while this command
/// runs; it thaws when stdin closes, on Ctrl-C, at the timeout, or if this command dies.
pub fn freeze(a: FreezeCmdArgs) -> anyhow::Result<()> {
    let Target::Daemon(mut c, _) = a.volume.resolve()? else {
        anyhow::bail!(
            "volume {} is not served: there is nothing to freeze",
            a.volume.volume
        );
    };
    let r = c.call(Command::Freeze(FreezeArgs {
        mount: a.mount,
        timeout_ms: Some(a.timeout.as_millis().max(1) as u64),
    }))?;
    let mounts: Vec<&str> = r["frozen"]
        .as_array()
        .map(|m| m.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    eprintln!(
        "frozen: {} (thaws when stdin closes, on Ctrl-C, or after {:?})",
        mounts.join(", "),
        a.timeout
    );
    // Wait for stdin to close (or the timeout); the daemon thaws when this connection ends.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(a.timeout);
    match c.call(Command::Thaw(FreezeArgs::default())) {
        Ok(_) => eprintln!("thawed"),
        Err(e) => eprintln!("thaw: {e} (the daemon thaws at the timeout in any case)"),
    }
    Ok(())
}

/// `snapblk thaw`: thaws a freeze held through the daemon (an emergency exit).
pub fn thaw(a: ThawArgs) -> anyhow::Result<()> {
    let Target::Daemon(mut c, _) = a.volume.resolve()? else {
        anyhow::bail!(
            "volume {} is not served: nothing is frozen through it",
            a.volume.volume
        );
    };
    let r = c.call(Command::Thaw(FreezeArgs::default()))?;
    outln!("thawed {}", r["thawed"]);
    Ok(())
}

/// The freeze watchdog process.
pub fn watchdog(a: WatchdogArgs) -> anyhow::Result<()> {
    let code = crate::ctl::freeze::run_watchdog(Duration::from_millis(a.timeout_ms), &a.mounts);
    std::process::exit(code);
}
