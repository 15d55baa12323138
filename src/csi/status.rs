//! gRPC status codes for what the layers below report, with messages a person can act on.
//! The codes follow the CSI specification's error tables.

use tonic::{Code, Status};

use crate::ctl::protocol::{CtlError, ErrorCode};
use crate::engine::EngineError;

/// The status for an engine error, prefixed with what was being done.
pub fn engine(context: &str, e: EngineError) -> Status {
    let code = match &e {
        EngineError::SnapshotNotFound(_)
        | EngineError::SnapshotIdNotFound(_)
        | EngineError::NotAVolume { .. } => Code::NotFound,
        // The spec's answer when changed blocks cannot be tracked: take a full backup.
        EngineError::Unrelated(_) => Code::FailedPrecondition,
        EngineError::SnapshotExists(_) | EngineError::AlreadyExists { .. } => Code::AlreadyExists,
        EngineError::Invalid(_) => Code::InvalidArgument,
        EngineError::OutOfRange { .. } => Code::OutOfRange,
        EngineError::Busy { .. } => Code::Aborted,
        _ if e.errno() == libc::ENOSPC => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    Status::new(code, format!("{context}: {e}"))
}

/// The status for an error reply of a volume daemon's control socket.
pub fn ctl(context: &str, e: CtlError) -> Status {
    let code = match e.code {
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::InvalidName | ErrorCode::BadRequest => Code::InvalidArgument,
        ErrorCode::Busy | ErrorCode::AlreadyFrozen => Code::Aborted,
        ErrorCode::Timeout => Code::DeadlineExceeded,
        // Unsupported: e.g. growing a served device on a kernel without UBLK_F_UPDATE_SIZE;
        // the external-resizer takes FailedPrecondition as "expand it while not in use".
        ErrorCode::FreezeUnsupported
        | ErrorCode::NfsNotFreezable
        | ErrorCode::NotFrozen
        | ErrorCode::Unsupported => Code::FailedPrecondition,
        ErrorCode::Io => Code::Unavailable,
        ErrorCode::NoSpace => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    Status::new(code, format!("{context}: {}", e.message))
}

/// The status for a failed local system operation (a file, a command).
pub fn io(context: &str, e: std::io::Error) -> Status {
    let code = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
        _ if e.kind() == std::io::ErrorKind::NotFound => Code::NotFound,
        _ => Code::Internal,
    };
    Status::new(code, format!("{context}: {e}"))
}

/// A missing or empty required field.
pub fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}

/// `value`, or InvalidArgument naming `field` when it is empty.
pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(missing(field))
    } else {
        Ok(value)
    }
}

/// A blocking task that panicked or was cancelled.
pub fn join(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("the operation's worker failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec_tables() {
        let s = engine("x", EngineError::SnapshotNotFound("s".into()));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().starts_with("x: "), "{}", s.message());
        assert_eq!(
            engine("x", EngineError::Invalid("bad".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            io("x", std::io::Error::from_raw_os_error(libc::ENOSPC)).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            ctl("x", CtlError::new(ErrorCode::Timeout, "slow")).code(),
            Code::DeadlineExceeded
        );
    }
}
