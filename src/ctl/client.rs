//! A blocking client of the control socket, for the command line.

use std::io::{BufRead, BufReader, Read, Write};
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
        Client::connect_with_timeout(path, REPLY_TIMEOUT)
    }

    /// Connects to the socket at `path`, giving up on any send or reply that takes longer
    /// than `timeout` (for quick questions to a daemon that may hang, such as metrics).
    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Client, CtlError> {
        let s = UnixStream::connect(path).map_err(|e| {
            CtlError::new(
                ErrorCode::Io,
                format!("cannot reach the daemon at {}: {e}", path.display()),
            )
        })?;
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
