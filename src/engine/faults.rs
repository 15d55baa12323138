//! Crash injection for tests: the engine calls [`crash_point`] before every step that
//! makes something durable (fsync, rename), so a test can stop a metadata change after
//! any step and check that reopening finds it either done or not done, never half.
//!
//! The counter is per thread, because every metadata change runs on its caller's thread;
//! tests running in parallel do not disturb each other.

use std::cell::Cell;

use super::error::{EngineError, Result};

thread_local! {
    static COUNTDOWN: Cell<u64> = const { Cell::new(0) };
    static STEPS: Cell<u64> = const { Cell::new(0) };
    static SYNC_FAILS: Cell<u64> = const { Cell::new(0) };
    static APPEND_FAILS: Cell<u64> = const { Cell::new(0) };
}

/// Makes the `n`-th map journal append from now (1-based) on this thread write half its
/// record and fail with ENOSPC, as on a full disk. `0` disarms.
pub fn fail_append_after(n: u64) {
    APPEND_FAILS.with(|c| c.set(n));
}

/// The error a map journal append gets when one is due (see [`fail_append_after`]).
pub(crate) fn append_fault() -> Option<std::io::Error> {
    countdown(&APPEND_FAILS).then(|| std::io::Error::from_raw_os_error(libc::ENOSPC))
}

/// Counts `c` down; true when it reaches its armed step.
fn countdown(c: &'static std::thread::LocalKey<Cell<u64>>) -> bool {
    c.with(|c| match c.get() {
        0 => false,
        1 => {
            c.set(0);
            true
        }
        n => {
            c.set(n - 1);
            false
        }
    })
}

/// Makes the `n`-th data sync from now (1-based) on this thread fail with EIO, as when
/// the disk could not write back the data. `0` disarms.
pub fn fail_sync_after(n: u64) {
    SYNC_FAILS.with(|c| c.set(n));
}

/// The error a data sync gets when one is due (see [`fail_sync_after`]).
pub(crate) fn sync_fault() -> Option<std::io::Error> {
    countdown(&SYNC_FAILS).then(|| std::io::Error::from_raw_os_error(libc::EIO))
}

/// Arms a simulated crash: the `n`-th durable step from now (1-based) fails with
/// [`EngineError::InjectedCrash`] instead of running. `0` disarms.
pub fn crash_after(n: u64) {
    COUNTDOWN.with(|c| c.set(n));
}

/// Disarms any pending simulated crash.
pub fn disarm() {
    crash_after(0);
}

/// How many durable steps this thread has passed through; lets a test learn how many
/// crash points an operation has.
pub fn steps_taken() -> u64 {
    STEPS.with(|s| s.get())
}

/// Marks a durable step named `what`; fails if a simulated crash is due here.
pub(crate) fn crash_point(what: &'static str) -> Result<()> {
    STEPS.with(|s| s.set(s.get() + 1));
    COUNTDOWN.with(|c| match c.get() {
        0 => Ok(()),
        1 => {
            c.set(0);
            Err(EngineError::InjectedCrash(what))
        }
        n => {
            c.set(n - 1);
            Ok(())
        }
    })
}
