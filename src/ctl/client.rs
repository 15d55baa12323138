//! A blocking client of the control socket, for the command line and the CSI node plugin.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::protocol::{parse_reply, Command, CtlError, ErrorCode, ExportArgs, Request};

/// How long the client waits for a reply (a snapshot with a long freeze timeout included).
const REPLY_TIMEOUT: Duration = Duration::from_secs(330);

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
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| CtlError::new(ErrorCode::Io, format!("sending to the daemon: {e}")))?;
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

fn unreachable_daemon(path: &Path, e: std::io::Error) -> CtlError {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
