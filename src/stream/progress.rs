//! Progress reporting, kept as a trait so the library stays free of terminal code: the
//! command line draws a bar, the daemon may log, tests pass [`NoProgress`].

/// Receives progress in bytes of data copied (zero extents cost nothing and are not
/// counted).
pub trait Progress {
    /// The work starts; `total_bytes` of data are to be copied.
    fn start(&self, _total_bytes: u64) {}
    /// `bytes` more were copied.
    fn advance(&self, _bytes: u64) {}
    /// The work ended (successfully or not).
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}
