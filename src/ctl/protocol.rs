//! The control protocol: one JSON object per line each way, over a Unix socket.
//!
//! Request:  `{"v":1,"id":<any, echoed>,"cmd":"snapshot.create","args":{...}}`
//! Reply:    `{"v":1,"id":...,"result":{...}}` or
//!           `{"v":1,"id":...,"error":{"code":"not_found","message":"..."}}`
//!
//! Version 1. A request with another `v` gets `unsupported_version`; fields a command does
//! not know are refused (`bad_request`), so a typo never passes silently.
//! See docs/control-protocol.md.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Protocol version spoken by this build.
pub const VERSION: u64 = 1;
/// Longest request line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest freeze a client may ask for.
pub const MAX_FREEZE_TIMEOUT: Duration = Duration::from_secs(300);
/// Freeze timeout when the client names none.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Machine-readable error codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, missing or ill-typed fields.
    BadRequest,
    /// A protocol version this daemon does not speak.
    UnsupportedVersion,
    /// A command this daemon does not know.
    UnknownCommand,
    /// A request line longer than [`MAX_LINE`].
    LineTooLong,
    /// The peer is not allowed to use the socket.
    PermissionDenied,
    /// No such snapshot (or mount).
    NotFound,
    /// A snapshot of that name exists and is not the one asked for.
    AlreadyExists,
    /// A snapshot name that is not allowed.
    InvalidName,
    /// Another operation holds what this one needs.
    Busy,
    /// The file system cannot be frozen.
    FreezeUnsupported,
    /// The consumer is an NFS client or export, which cannot be frozen from here.
    NfsNotFreezable,
    /// The file system is already frozen by someone else.
    AlreadyFrozen,
    /// Not frozen when a thaw was asked.
    NotFrozen,
    /// The operation did not finish in time.
    Timeout,
    /// What was asked needs something this daemon, its driver or kernel lacks; the
    /// message says what, and what to do instead.
    Unsupported,
    /// The file system under the volume's folder is full: nothing changed; free space
    /// there and try again.
    NoSpace,
    /// An I/O error on the volume.
    Io,
    /// A bug or an unexpected state; the message says more.
    Internal,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct CtlError {
    pub code: ErrorCode,
    pub message: String,
}

impl CtlError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CtlError {
        CtlError {
            code,
            message: message.into(),
        }
    }
}

/// What to do about a mounted file system when taking a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FreezeMode {
    /// Freeze every file system mounted from the device (application-consistent).
    #[default]
    Auto,
    /// Do not freeze (crash-consistent: every acknowledged write is in the snapshot).
    None,
}

/// Arguments of `snapshot.create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateArgs {
    pub name: String,
    #[serde(default)]
    pub freeze: FreezeMode,
    /// Freeze this mount point instead of looking the device's mounts up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// Longest time the file system may stay frozen, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_timeout_ms: Option<u64>,
}

/// Arguments naming one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameArgs {
    pub name: String,
}

/// Arguments of `export`: the snapshot, and for an incremental stream its base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportArgs {
    pub snapshot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// Arguments of `snapshot.clone`: the snapshot, and the new volume's folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneArgs {
    pub name: String,
    /// Absolute path of the new volume's folder, which must not exist.
    pub dir: String,
}

/// Arguments of `volume.resize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeArgs {
    /// The new size in bytes: a multiple of the block size, not smaller than the volume.
    pub size: u64,
}

/// Arguments of `freeze` and `thaw`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FreezeArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// For `freeze`: thaw automatically after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A command with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Status,
    /// Counters for metrics: requests by direction, snapshots, freeze windows, space.
    Stats,
    SnapshotCreate(SnapshotCreateArgs),
    SnapshotList,
    SnapshotShow(NameArgs),
    SnapshotDelete(NameArgs),
    SnapshotExpose(NameArgs),
    SnapshotUnexpose(NameArgs),
    SnapshotClone(CloneArgs),
    VolumeResize(ResizeArgs),
    /// Answered by one reply line, then the stream's bytes until the connection closes.
    Export(ExportArgs),
    Freeze(FreezeArgs),
    Thaw(FreezeArgs),
}

impl Command {
    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Stats => "stats",
            Command::SnapshotCreate(_) => "snapshot.create",
            Command::SnapshotList => "snapshot.list",
            Command::SnapshotShow(_) => "snapshot.show",
            Command::SnapshotDelete(_) => "snapshot.delete",
            Command::SnapshotExpose(_) => "snapshot.expose",
            Command::SnapshotUnexpose(_) => "snapshot.unexpose",
            Command::SnapshotClone(_) => "snapshot.clone",
            Command::VolumeResize(_) => "volume.resize",
            Command::Export(_) => "export",
            Command::Freeze(_) => "freeze",
            Command::Thaw(_) => "thaw",
        }
    }

    fn args(&self) -> Value {
        let v = match self {
            Command::Status | Command::Stats | Command::SnapshotList => Ok(json!({})),
            Command::SnapshotCreate(a) => serde_json::to_value(a),
            Command::SnapshotShow(a)
            | Command::SnapshotDelete(a)
            | Command::SnapshotExpose(a)
            | Command::SnapshotUnexpose(a) => serde_json::to_value(a),
            Command::SnapshotClone(a) => serde_json::to_value(a),
            Command::VolumeResize(a) => serde_json::to_value(a),
            Command::Export(a) => serde_json::to_value(a),
            Command::Freeze(a) | Command::Thaw(a) => serde_json::to_value(a),
        };
        v.unwrap_or_else(|_| json!({}))
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Echoed back in the reply, so a client can match replies to requests.
    pub id: Value,
    pub command: Command,
}

impl Request {
    /// The request as one line of JSON (without the newline).
    pub fn encode(&self) -> String {
        json!({"v": VERSION, "id": self.id, "cmd": self.command.name(), "args": self.command.args()}).to_string()
    }

    /// Parses one request line, with an error reply ready when it is not valid. The
    /// request id is returned with the error when it could be read, so it can be echoed.
    pub fn parse(line: &str) -> Result<Request, (Value, CtlError)> {
        let bad = |id: &Value, msg: String| (id.clone(), CtlError::new(ErrorCode::BadRequest, msg));
        let value: Value = serde_json::from_str(line)
            .map_err(|e| bad(&Value::Null, format!("request is not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| bad(&Value::Null, "request must be a JSON object".into()))?;
        let id = obj.get("id").cloned().unwrap_or(Value::Null);
        match obj.get("v").and_then(Value::as_u64) {
            Some(VERSION) => {}
            Some(v) => {
                return Err((
                    id,
                    CtlError::new(
                        ErrorCode::UnsupportedVersion,
                        format!("protocol version {v} is not supported; this daemon speaks version {VERSION}"),
                    ),
                ))
            }
            None => return Err(bad(&id, format!("missing protocol version: add \"v\":{VERSION}"))),
        }
        for key in obj.keys() {
            if !matches!(key.as_str(), "v" | "id" | "cmd" | "args") {
                return Err(bad(&id, format!("unknown field {key:?} in request")));
            }
        }
        let cmd = obj
            .get("cmd")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(&id, "missing \"cmd\" (a string)".into()))?;
        let args = obj.get("args").cloned().unwrap_or_else(|| json!({}));
        if !args.is_object() {
            return Err(bad(&id, "\"args\" must be an object".into()));
        }
        fn typed<T: serde::de::DeserializeOwned>(cmd: &str, args: Value) -> Result<T, String> {
            serde_json::from_value(args).map_err(|e| format!("bad arguments for {cmd}: {e}"))
        }
        let empty = |args: &Value| -> Result<(), String> {
            match args.as_object().map(|o| o.keys().next().cloned()) {
                Some(Some(k)) => Err(format!("{cmd} takes no arguments (got {k:?})")),
                _ => Ok(()),
            }
        };
        let command = match cmd {
            "status" => empty(&args).map(|()| Command::Status),
            "stats" => empty(&args).map(|()| Command::Stats),
            "snapshot.list" => empty(&args).map(|()| Command::SnapshotList),
            "snapshot.create" => typed(cmd, args).map(Command::SnapshotCreate),
            "snapshot.show" => typed(cmd, args).map(Command::SnapshotShow),
            "snapshot.delete" => typed(cmd, args).map(Command::SnapshotDelete),
            "snapshot.expose" => typed(cmd, args).map(Command::SnapshotExpose),
            "snapshot.unexpose" => typed(cmd, args).map(Command::SnapshotUnexpose),
            "snapshot.clone" => typed(cmd, args).map(Command::SnapshotClone),
            "volume.resize" => typed(cmd, args).map(Command::VolumeResize),
            "export" => typed(cmd, args).map(Command::Export),
            "freeze" => typed(cmd, args).map(Command::Freeze),
            "thaw" => typed(cmd, args).map(Command::Thaw),
            other => {
                return Err((
                    id,
                    CtlError::new(
                        ErrorCode::UnknownCommand,
                        format!(
                            "unknown command {other:?}; known: status, stats, snapshot.create, snapshot.list, snapshot.show, snapshot.delete, snapshot.expose, snapshot.unexpose, snapshot.clone, volume.resize, export, freeze, thaw"
                        ),
                    ),
                ))
            }
        }
        .map_err(|m| bad(&id, m))?;
        Ok(Request { id, command })
    }
}

/// A reply line (without the newline) for request `id`.
pub fn reply(id: &Value, result: Result<Value, CtlError>) -> String {
    match result {
        Ok(r) => json!({"v": VERSION, "id": id, "result": r}).to_string(),
        Err(e) => json!({"v": VERSION, "id": id, "error": e}).to_string(),
    }
}

/// Parses a reply line into the result or the error it carries.
pub fn parse_reply(line: &str) -> Result<Value, CtlError> {
    let v: Value = serde_json::from_str(line).map_err(|e| {
        CtlError::new(
            ErrorCode::Internal,
            format!("the daemon sent a reply that is not JSON: {e}"),
        )
    })?;
    if let Some(err) = v.get("error") {
        return Err(serde_json::from_value(err.clone()).unwrap_or_else(|_| {
            CtlError::new(ErrorCode::Internal, format!("malformed error reply: {err}"))
        }));
    }
    v.get("result")
        .cloned()
        .ok_or_else(|| CtlError::new(ErrorCode::Internal, "reply has neither result nor error"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> ErrorCode {
        Request::parse(line)
            .err()
            .map(|(_, e)| e.code)
            .unwrap_or(ErrorCode::Internal)
    }

    #[test]
    fn round_trip_every_command() {
        let cmds = vec![
            Command::Status,
            Command::Stats,
            Command::SnapshotList,
            Command::SnapshotCreate(SnapshotCreateArgs {
                name: "a".into(),
                freeze: FreezeMode::None,
                mount: Some("/mnt".into()),
                freeze_timeout_ms: Some(500),
            }),
            Command::SnapshotShow(NameArgs { name: "a".into() }),
            Command::SnapshotDelete(NameArgs { name: "a".into() }),
            Command::SnapshotExpose(NameArgs { name: "a".into() }),
            Command::SnapshotUnexpose(NameArgs { name: "a".into() }),
            Command::SnapshotClone(CloneArgs {
                name: "a".into(),
                dir: "/vols/restored".into(),
            }),
            Command::VolumeResize(ResizeArgs { size: 1 << 30 }),
            Command::Export(ExportArgs {
                snapshot: "b".into(),
                since: Some("a".into()),
            }),
            Command::Export(ExportArgs {
                snapshot: "b".into(),
                since: None,
            }),
            Command::Freeze(FreezeArgs {
                mount: None,
                timeout_ms: Some(1000),
            }),
            Command::Thaw(FreezeArgs::default()),
        ];
        for (i, command) in cmds.into_iter().enumerate() {
            let r = Request {
                id: json!(i),
                command,
            };
            assert_eq!(Request::parse(&r.encode()).expect("parse"), r);
        }
    }

    /// Table of malformed requests and the error each must get.
    #[test]
    fn malformed_requests_get_clear_errors() {
        let table: &[(&str, ErrorCode)] = &[
            ("", ErrorCode::BadRequest),
            ("not json", ErrorCode::BadRequest),
            ("[1,2]", ErrorCode::BadRequest),
            ("\"status\"", ErrorCode::BadRequest),
            ("{}", ErrorCode::BadRequest),
            (r#"{"cmd":"status"}"#, ErrorCode::BadRequest),
            (r#"{"v":2,"cmd":"status"}"#, ErrorCode::UnsupportedVersion),
            (r#"{"v":"1","cmd":"status"}"#, ErrorCode::BadRequest),
            (r#"{"v":1}"#, ErrorCode::BadRequest),
            (r#"{"v":1,"cmd":7}"#, ErrorCode::BadRequest),
            (r#"{"v":1,"cmd":"launch"}"#, ErrorCode::UnknownCommand),
            (r#"{"v":1,"cmd":"status","args":[]}"#, ErrorCode::BadRequest),
            (
                r#"{"v":1,"cmd":"status","args":{"x":1}}"#,
                ErrorCode::BadRequest,
            ),
            (r#"{"v":1,"cmd":"status","extra":1}"#, ErrorCode::BadRequest),
            (
                r#"{"v":1,"cmd":"stats","args":{"reset":true}}"#,
                ErrorCode::BadRequest,
            ),
            (r#"{"v":1,"cmd":"snapshot.create"}"#, ErrorCode::BadRequest),
            (
                r#"{"v":1,"cmd":"snapshot.create","args":{"name":5}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"v":1,"cmd":"snapshot.create","args":{"name":"a","freeze":"maybe"}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"v":1,"cmd":"snapshot.create","args":{"name":"a","frezee":"none"}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"v":1,"cmd":"snapshot.create","args":{"name":"a","freeze_timeout_ms":-1}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"v":1,"cmd":"snapshot.delete","args":{}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"v":1,"cmd":"freeze","args":{"timeout_ms":"soon"}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"v":1,"cmd":"volume.resize","args":{"size":-4096}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"v":1,"cmd":"volume.resize","args":{"size":"20G"}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"v":1,"cmd":"snapshot.clone","args":{"name":"a"}}"#,
                ErrorCode::BadRequest,
            ),
        ];
        for (line, want) in table {
            assert_eq!(code(line), *want, "{line}");
        }
    }

    #[test]
    fn ids_are_echoed_even_in_errors() {
        let (id, e) = Request::parse(r#"{"v":1,"id":"abc","cmd":"nope"}"#).expect_err("unknown");
        assert_eq!(id, json!("abc"));
        assert_eq!(e.code, ErrorCode::UnknownCommand);
        let line = reply(&id, Err(e));
        let back = parse_reply(&line).expect_err("an error");
        assert_eq!(back.code, ErrorCode::UnknownCommand);
        assert_eq!(
            parse_reply(&reply(&json!(1), Ok(json!({"x": 1})))).expect("ok"),
            json!({"x": 1})
        );
        assert!(parse_reply("garbage").is_err());
        assert!(parse_reply("{}").is_err());
    }
}
