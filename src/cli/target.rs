//! Which volume a command talks to: the daemon serving it (through its control socket),
//! or its folder directly when it is not served.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::ctl::client::Client;
use crate::ctl::server::default_socket;

/// How a command names its volume.
#[derive(Debug, Clone, Args)]
pub struct VolumeArg {
    /// The volume: its folder, or the name of a served volume (its folder's name).
    #[arg(long, short = 'V', value_name = "VOLUME")]
    pub volume: String,
    /// The daemon's control socket [default: /run/snapblk/<volume name>.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// Where to send a command.
pub enum Target {
    /// A daemon serves the volume.
    Daemon(Client, PathBuf),
    /// Nobody serves it: open its folder.
    Folder(PathBuf),
}

impl VolumeArg {
    /// The volume's name (its folder's last component).
    pub fn name(&self) -> String {
        Path::new(&self.volume)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.volume.clone())
    }

    /// Connects to the daemon if one serves the volume, else falls back to the folder.
    pub fn resolve(&self) -> anyhow::Result<Target> {
        resolve(&self.volume, self.socket.as_deref())
    }
}

/// Where to send a command for `volume` (a folder, or the name of a served volume): the
/// daemon at `socket` if given, else the daemon at the default socket of the volume's
/// name if one answers, else the folder.
pub fn resolve(volume: &str, socket: Option<&Path>) -> anyhow::Result<Target> {
    if let Some(s) = socket {
        return Ok(Target::Daemon(Client::connect(s)?, s.to_path_buf()));
    }
    let name = Path::new(volume)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| volume.to_string());
    let sock = default_socket(&name);
    if sock.exists() {
        if let Ok(c) = Client::connect(&sock) {
            return Ok(Target::Daemon(c, sock));
        }
    }
    let dir = PathBuf::from(volume);
    if dir.is_dir() {
        return Ok(Target::Folder(dir));
    }
    anyhow::bail!(
        "volume {volume:?}: no daemon answers at {} and there is no volume folder of that name",
        sock.display()
    )
}
