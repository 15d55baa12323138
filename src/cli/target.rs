//! Which volume a command talks to: the daemon serving it (through its control socket,
//! checked to serve exactly that volume), or its folder directly when it is not served.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::ctl::client::{Client, Expected};
use crate::ctl::protocol::ErrorCode;
use crate::ctl::server::{default_socket, SOCKET_DIR};

/// How a command names its volume.
#[derive(Debug, Clone, Args)]
pub struct VolumeArg {
    /// The volume: its folder, or the name of a served volume (its folder's last
    /// component; refused when several served volumes have that name). The daemon's
    /// answer is checked against it: a daemon serving another volume is refused.
    #[arg(long, short = 'V', value_name = "VOLUME")]
    pub volume: String,
    /// The daemon's control socket [default: /run/snapblk/<hash of the volume's folder>.sock,
    /// see `snapblk serve --help`].
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

/// What `volume` (a folder, or the name of a served volume) names.
fn expected(volume: &str) -> anyhow::Result<Expected> {
    let path = Path::new(volume);
    if path.is_dir() {
        let dir = std::fs::canonicalize(path)
            .map_err(|e| anyhow::anyhow!("cannot resolve the volume folder {volume}: {e}"))?;
        // A user allowed on the socket may not be allowed to read the folder: the folder
        // alone then identifies the volume.
        let volume_id = crate::engine::summary(&dir).ok().map(|s| s.volume_id);
        return Ok(Expected::Folder { dir, volume_id });
    }
    if volume.is_empty() || volume.contains('/') || volume == "." || volume == ".." {
        anyhow::bail!("volume {volume:?}: there is no volume folder there");
    }
    Ok(Expected::Name(volume.to_string()))
}

/// Where to send a command for `volume` (a folder, or the name of a served volume): the
/// daemon at `socket` if given, else the daemon at the folder's default socket if one
/// answers (else the folder itself), or for a bare name the one daemon under
/// /run/snapblk serving a volume of that name. The daemon's answer must match the volume
/// named: a daemon serving another one is refused.
pub fn resolve(volume: &str, socket: Option<&Path>) -> anyhow::Result<Target> {
    let want = expected(volume)?;
    if let Some(s) = socket {
        let mut c = Client::connect(s)?;
        c.verify(s, &want)?;
        return Ok(Target::Daemon(c, s.to_path_buf()));
    }
    match &want {
        Expected::Folder { dir, .. } => {
            let sock = default_socket(dir)?;
            match Client::connect(&sock) {
                Ok(mut c) => {
                    c.verify(&sock, &want)?;
                    Ok(Target::Daemon(c, sock))
                }
                Err(e) if e.code == ErrorCode::PermissionDenied => Err(e.into()),
                // No daemon (or a stale socket): the folder itself.
                Err(_) => Ok(Target::Folder(dir.clone())),
            }
        }
        Expected::Name(name) => find_by_name(Path::new(SOCKET_DIR), name, &want),
    }
}

/// How long a daemon asked while searching by name may take to answer.
const SCAN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The one daemon with a socket in `sockets` serving a volume named `name`.
fn find_by_name(sockets: &Path, name: &str, want: &Expected) -> anyhow::Result<Target> {
    let mut found: Vec<(Client, PathBuf, String)> = Vec::new();
    let mut socks: Vec<PathBuf> = std::fs::read_dir(sockets)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    socks.sort();
    for sock in socks {
        let Ok(mut c) = Client::connect(&sock) else {
            continue;
        };
        // A daemon still bringing its device up (or hung) must not hold the search.
        c.set_reply_timeout(SCAN_TIMEOUT);
        if let Ok(st) = c.verify(&sock, want) {
            let dir = st["dir"].as_str().unwrap_or("?").to_string();
            c.set_reply_timeout(crate::ctl::client::REPLY_TIMEOUT);
            found.push((c, sock, dir));
        }
    }
    match found.len() {
        0 => anyhow::bail!(
            "volume {name:?}: no daemon with a socket in {} serves a volume of that name, and \
             there is no volume folder of that name here; name its folder (-V /path/to/{name}) \
             or its socket (--socket)",
            sockets.display()
        ),
        1 => {
            let (c, sock, _) = found.remove(0);
            Ok(Target::Daemon(c, sock))
        }
        _ => anyhow::bail!(
            "volume {name:?}: several served volumes have that name ({}); name the folder \
             instead (-V /path/to/{name})",
            found
                .iter()
                .map(|(_, _, d)| d.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
