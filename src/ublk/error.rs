//! Errors of the ublk layer: device setup, recovery and shutdown (per-request errors
//! never surface here; they become a negative errno for that request only).

use std::path::PathBuf;

use crate::engine::EngineError;

/// Everything that can stop `serve` from bringing up, running or removing a device.
#[derive(Debug, thiserror::Error)]
pub enum UblkLayerError {
    /// The kernel has no ublk driver loaded.
    #[error("the ublk driver is not loaded ({path} is missing): load it with `modprobe ublk_drv`")]
    DriverMissing { path: &'static str },

    /// The volume folder could not be opened (missing, corrupt, busy...).
    #[error("cannot open volume {}: {source}", path.display())]
    Volume {
        path: PathBuf,
        #[source]
        source: EngineError,
    },

    /// A ublk control or queue operation failed.
    #[error("ublk {op} failed: {detail}")]
    Ublk { op: &'static str, detail: String },

    /// An option that cannot work with this volume or device.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// `--recover` found no device to take over, or one that does not fit the volume.
    #[error("cannot recover: {0}")]
    Recover(String),

    /// A system call of the daemon itself failed.
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The final flush of the volume after the device stopped failed: data acknowledged
    /// before the last FLUSH is safe, later writes may not be.
    #[error("final flush of volume {volume} failed: {source}")]
    FinalFlush {
        volume: String,
        #[source]
        source: EngineError,
    },

    /// The device went live but what it needs then (its control socket) failed: it was
    /// stopped and removed again.
    #[error("the device was removed again: {0}")]
    NotReady(String),

    /// A queue thread ended on its own (device removed from outside, or a queue error).
    #[error("device {dev_id}: {queues} queue(s) stopped unexpectedly; see the log")]
    QueueFailed { dev_id: u32, queues: usize },
}

impl UblkLayerError {
    /// Wraps a libublk error with the operation it came from, naming the errno.
    pub fn ublk(op: &'static str, err: libublk::UblkError) -> Self {
        UblkLayerError::Ublk {
            op,
            detail: describe_ublk_error(&err),
        }
    }

    /// Wraps the last OS error of a system call.
    pub fn last_os(op: &'static str) -> Self {
        UblkLayerError::Sys {
            op,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// Renders a libublk error with its errno spelled out (its own messages omit it).
pub fn describe_ublk_error(err: &libublk::UblkError) -> String {
    use libublk::UblkError as E;
    match err {
        E::OtherError(code) | E::UringIOError(code) => {
            let errno = code.checked_abs().unwrap_or(libc::EINVAL);
            format!(
                "{} (errno {})",
                std::io::Error::from_raw_os_error(errno),
                errno
            )
        }
        E::IOError(e) => e.to_string(),
        E::JsonError(e) => format!("device json: {e}"),
        other => other.to_string(),
    }
}

/// Result of the ublk layer.
pub type Result<T> = std::result::Result<T, UblkLayerError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ublk_error_names_the_errno() {
        let e = UblkLayerError::ublk("add device", libublk::UblkError::OtherError(-libc::EEXIST));
        let msg = e.to_string();
        assert!(msg.contains("add device"), "{msg}");
        assert!(msg.contains("errno 17"), "{msg}");
    }

    #[test]
    fn driver_missing_says_how_to_fix() {
        let msg = UblkLayerError::DriverMissing {
            path: "/dev/ublk-control",
        }
        .to_string();
        assert!(msg.contains("modprobe ublk_drv"), "{msg}");
    }
}
