//! A blocking client of the control socket, for the command line and the CSI node plugin,
//! and the check that a daemon serves the volume a command names (a socket path alone
//! proves nothing).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::protocol::{parse_reply, Command, CtlError, ErrorCode, ExportArgs, Request};

/// How long the client waits for a reply (a snapshot with a long freeze timeout included).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(330);

/// A connection to a daemon's control socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, CtlError> {
        let s = UnixStream::connect(path).map_err(|e| unreachable_daemon(path, e))?;
        Client::over(s, path, REPLY_TIMEOUT)
    }

    /// Connects to the socket at `path` without waiting, and gives up on any send or reply
    /// that takes longer than `timeout` (for quick questions to a daemon that may hang,
    /// such as metrics). A daemon that stopped accepting connections (its queue is full)
    /// is refused at once instead of blocking the caller.
    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Client, CtlError> {
        let s = connect_now(path).map_err(|e| unreachable_daemon(path, e))?;
        Client::over(s, path, timeout)
    }

    fn over(s: UnixStream, path: &Path, timeout: Duration) -> Result<Client, CtlError> {
        let _ = s.set_read_timeout(Some(timeout));
        let _ = s.set_write_timeout(Some(timeout));
        let writer = s
            .try_clone()
            .map_err(|e| CtlError::new(ErrorCode::Io, format!("{}: {e}", path.display())))?;
        Ok(Client {
            reader: BufReader::new(s),
            writer,
            next_id: 1,
        })
    }

    /// Sets how long to wait for each reply (a short wait suits probing many daemons).
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        let _ = self.reader.get_ref().set_read_timeout(Some(timeout));
    }

    /// Asks for an export stream: returns the daemon's description of it and the
    /// connection to read the stream's bytes from (to its end).
    pub fn export(mut self, args: ExportArgs) -> Result<(Value, impl Read), CtlError> {
        let head = self.call(Command::Export(args))?;
        Ok((head, self.reader))
    }

    /// Sends `command` and waits for its reply.
    pub fn call(&mut self, command: Command) -> Result<Value, CtlError> {
        let req = Request {
            id: Value::from(self.next_id),
            command,
        };
        self.next_id += 1;
        let line = req.encode() + "\n";
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            // A daemon that refuses a client says why before it closes the connection.
            let mut said = String::new();
            if self.reader.read_line(&mut said).is_ok_and(|n| n > 0) {
                parse_reply(said.trim_end())?;
            }
            return Err(CtlError::new(
                ErrorCode::Io,
                format!("sending to the daemon: {e}"),
            ));
        }
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(0) => Err(CtlError::new(
                ErrorCode::Io,
                "the daemon closed the connection without a reply",
            )),
            Ok(_) => parse_reply(answer.trim_end()),
            Err(e) => Err(CtlError::new(
                ErrorCode::Io,
                format!("waiting for the daemon's reply: {e}"),
            )),
        }
    }
}

/// Why the daemon at `path` cannot be reached; a refused permission says how to get it.
fn unreachable_daemon(path: &Path, e: std::io::Error) -> CtlError {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        return CtlError::new(
            ErrorCode::PermissionDenied,
            format!(
                "cannot reach the daemon at {}: {e}. This user (uid {uid}) is not \
                 allowed to use it: the daemon must be started with --allow-uid {uid} \
                 or --allow-gid of one of its groups",
                path.display()
            ),
        );
    }
    CtlError::new(
        ErrorCode::Io,
        format!("cannot reach the daemon at {}: {e}", path.display()),
    )
}

/// Connects a non-blocking socket: on a Unix socket this either succeeds at once or fails
/// (EAGAIN when the listener's queue is full), then the stream is made blocking again.
fn connect_now(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    let s = UnixStream::from(fd);
    s.set_nonblocking(false)?;
    Ok(s)
}

/// The volume a command names, as the client knows it before asking a daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// The volume in this (canonical) folder; its id when the client can read the manifest.
    Folder {
        dir: PathBuf,
        volume_id: Option<String>,
    },
    /// A served volume known by its name (its folder's last component) only.
    Name(String),
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Folder { dir, .. } => write!(f, "{}", dir.display()),
            Expected::Name(n) => write!(f, "{n:?}"),
        }
    }
}

/// Checks that `status` (a daemon's answer to `status`, from `socket`) describes the
/// volume `want`: the same folder and volume id, or for a bare name the same name.
pub fn check_identity(status: &Value, want: &Expected, socket: &Path) -> Result<(), CtlError> {
    let dir = status.get("dir").and_then(Value::as_str).map(PathBuf::from);
    let id = status.pointer("/volume/volume_id").and_then(Value::as_str);
    let name = status.pointer("/volume/name").and_then(Value::as_str);
    let serves = match (&dir, id) {
        (Some(d), Some(i)) => format!("volume {i} in {}", d.display()),
        (None, Some(i)) => format!("volume {i}"),
        _ => "a volume it does not identify".to_string(),
    };
    let wrong = || {
        CtlError::new(
            ErrorCode::NotFound,
            format!(
                "the daemon at {} serves {serves}, not the volume {want}; refusing to send \
                 the command to the wrong volume",
                socket.display()
            ),
        )
    };
    match want {
        Expected::Folder {
            dir: want_dir,
            volume_id,
        } => {
            if dir.is_none() && (volume_id.is_none() || id.is_none()) {
                return Err(CtlError::new(
                    ErrorCode::NotFound,
                    format!(
                        "the daemon at {} does not say which folder it serves, so it cannot \
                         be checked to serve {want}",
                        socket.display()
                    ),
                ));
            }
            if dir.as_ref().is_some_and(|d| d != want_dir) {
                return Err(wrong());
            }
            if let Some(w) = volume_id {
                if id != Some(w.as_str()) {
                    return Err(wrong());
                }
            }
            Ok(())
        }
        Expected::Name(n) => {
            if name == Some(n.as_str()) {
                Ok(())
            } else {
                Err(wrong())
            }
        }
    }
}

impl Client {
    /// Asks the daemon for its status and checks that it serves `want` (see
    /// [`check_identity`]); returns the status.
    pub fn verify(&mut self, socket: &Path, want: &Expected) -> Result<Value, CtlError> {
        let status = self.call(Command::Status)?;
        check_identity(&status, want, socket)?;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    fn status(dir: &str, id: &str, name: &str) -> Value {
        json!({"dir": dir, "volume": {"volume_id": id, "name": name}})
    }

    #[test]
    fn a_daemon_of_another_volume_is_refused() {
        let sock = Path::new("/run/snapblk/x.sock");
        let a = Expected::Folder {
            dir: "/a/vol1".into(),
            volume_id: Some("id-a".into()),
        };
        check_identity(&status("/a/vol1", "id-a", "vol1"), &a, sock).expect("same volume");
        // Same folder name, another folder.
        let e = check_identity(&status("/b/vol1", "id-b", "vol1"), &a, sock).expect_err("other");
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(
            e.message.contains("not the volume /a/vol1"),
            "{}",
            e.message
        );
        // A copy of the folder elsewhere (same id), or another volume in the same place.
        check_identity(&status("/c/vol1", "id-a", "vol1"), &a, sock).expect_err("copy");
        check_identity(&status("/a/vol1", "id-new", "vol1"), &a, sock).expect_err("replaced");
        // Without the manifest (not readable by this user) the folder decides.
        let unreadable = Expected::Folder {
            dir: "/a/vol1".into(),
            volume_id: None,
        };
        check_identity(&status("/a/vol1", "id-a", "vol1"), &unreadable, sock).expect("folder");
        check_identity(&status("/b/vol1", "id-a", "vol1"), &unreadable, sock)
            .expect_err("other folder");
        // A daemon that does not say which folder it serves cannot be checked by folder only.
        check_identity(&json!({"volume": {"volume_id": "id-a"}}), &unreadable, sock)
            .expect_err("unverifiable");
        check_identity(&json!({"volume": {"volume_id": "id-a"}}), &a, sock).expect("by id");
        // A bare name checks the name.
        let n = Expected::Name("vol1".into());
        check_identity(&status("/b/vol1", "id-b", "vol1"), &n, sock).expect("name");
        check_identity(&status("/b/vol2", "id-b", "vol2"), &n, sock).expect_err("other name");
    }

    #[test]
    fn a_full_listener_is_refused_at_once() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("hung.sock");
        // Bound and listening with the smallest queue, never accepting: a hung daemon.
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        // SAFETY: listen(2) on a descriptor this test owns, with integer arguments.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let t0 = Instant::now();
        let mut held = vec![];
        let mut refused = None;
        for _ in 0..64 {
            match Client::connect_with_timeout(&path, Duration::from_millis(200)) {
                Ok(c) => held.push(c),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let e = refused.expect("a full queue refuses");
        assert_eq!(e.code, ErrorCode::Io);
        assert!(
            e.message.contains("cannot reach the daemon"),
            "{}",
            e.message
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // A connected client's question times out instead of waiting for ever.
        let mut c = held.pop().expect("one connection was queued");
        let t1 = Instant::now();
        let e = c.call(Command::Status).expect_err("nobody answers");
        assert_eq!(e.code, ErrorCode::Io);
        assert!(t1.elapsed() < Duration::from_secs(5), "{:?}", t1.elapsed());
    }
}
