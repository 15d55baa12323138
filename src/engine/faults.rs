//! Crash injection for tests: the engine calls [`crash_point`] before every step that
//! makes something durable (fsync, rename) and at the moments between the steps of a cut,
//! so a test can stop a metadata change after any step and check that reopening finds it
//! either done or not done, never half, with every acknowledged write in place.
//!
//! The counters are per thread, because every metadata change runs on its caller's thread;
//! tests running in parallel do not disturb each other.
//!
//! Compiled only with the `fault-injection` feature (which the tests turn on) or in the
//! library's own unit tests: a production build has no way to inject a fault, and the
//! hooks below are empty functions the compiler removes.

#[cfg(any(test, feature = "fault-injection"))]
pub use enabled::*;

#[cfg(not(any(test, feature = "fault-injection")))]
pub(crate) use disabled::*;

#[cfg(any(test, feature = "fault-injection"))]
mod enabled {
    use std::cell::{Cell, RefCell};

    use crate::engine::error::{EngineError, Result};

    /// What [`on_step`] runs at each crash point of this thread.
    type StepHook = Box<dyn FnMut(&'static str)>;

    thread_local! {
        static COUNTDOWN: Cell<u64> = const { Cell::new(0) };
        static STEPS: Cell<u64> = const { Cell::new(0) };
        static SYNC_FAILS: Cell<u64> = const { Cell::new(0) };
        static APPEND_FAILS: Cell<u64> = const { Cell::new(0) };
        static COMMIT_FAILS: Cell<u64> = const { Cell::new(0) };
        static WRITE_FAILS: Cell<u64> = const { Cell::new(0) };
        static WRITE_ERRNO: Cell<i32> = const { Cell::new(0) };
        static HOOK: RefCell<Option<StepHook>> = const { RefCell::new(None) };
    }

    /// Makes the `n`-th map journal append from now (1-based) on this thread write half
    /// its record and fail with ENOSPC, as on a full disk. `0` disarms.
    pub fn fail_append_after(n: u64) {
        APPEND_FAILS.with(|c| c.set(n));
    }

    /// The error a map journal append gets when one is due (see [`fail_append_after`]).
    pub(crate) fn append_fault() -> Option<std::io::Error> {
        countdown(&APPEND_FAILS).then(|| std::io::Error::from_raw_os_error(libc::ENOSPC))
    }

    /// Makes the next `n` atomic file replacements on this thread (manifest commits,
    /// journal compactions) fail with ENOSPC before their rename, as on a full disk.
    /// `0` disarms.
    pub fn fail_next_commits(n: u64) {
        COMMIT_FAILS.with(|c| c.set(n));
    }

    /// The error an atomic replacement gets while some are due (see
    /// [`fail_next_commits`]).
    pub(crate) fn commit_fault() -> Option<std::io::Error> {
        COMMIT_FAILS.with(|c| {
            let n = c.get();
            (n > 0).then(|| {
                c.set(n - 1);
                std::io::Error::from_raw_os_error(libc::ENOSPC)
            })
        })
    }

    /// Makes the `n`-th data write of [`crate::engine::Volume::write`] from now (1-based)
    /// on this thread store half its bytes and fail with `errno` (ENOSPC for a full disk,
    /// EIO for a failing one). `0` disarms.
    pub fn fail_write_after(n: u64, errno: i32) {
        WRITE_FAILS.with(|c| c.set(n));
        WRITE_ERRNO.with(|c| c.set(errno));
    }

    /// The error a data write gets when one is due (see [`fail_write_after`]).
    pub(crate) fn write_fault() -> Option<std::io::Error> {
        countdown(&WRITE_FAILS)
            .then(|| std::io::Error::from_raw_os_error(WRITE_ERRNO.with(|c| c.get())))
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

    /// Arms a simulated crash: the `n`-th crash point from now (1-based) fails with
    /// [`EngineError::InjectedCrash`] instead of running. `0` disarms.
    pub fn crash_after(n: u64) {
        COUNTDOWN.with(|c| c.set(n));
    }

    /// Disarms any pending simulated crash.
    pub fn disarm() {
        crash_after(0);
    }

    /// How many crash points this thread has passed through; lets a test learn how many
    /// crash points an operation has.
    pub fn steps_taken() -> u64 {
        STEPS.with(|s| s.get())
    }

    /// Runs `hook` with the step's name at every crash point of this thread, before the
    /// armed crash (if any) fires; `None` removes it. A test uses it to stop a metadata
    /// change between two steps while other threads write, as a busy daemon would.
    pub fn on_step(hook: Option<Box<dyn FnMut(&'static str)>>) {
        HOOK.with(|h| *h.borrow_mut() = hook);
    }

    /// Marks a crash point named `what`; fails if a simulated crash is due here.
    pub(crate) fn crash_point(what: &'static str) -> Result<()> {
        STEPS.with(|s| s.set(s.get() + 1));
        // Taken out while it runs: the hook may call the engine, which passes crash points.
        if let Some(mut hook) = HOOK.with(|h| h.borrow_mut().take()) {
            hook(what);
            HOOK.with(|h| {
                let mut slot = h.borrow_mut();
                if slot.is_none() {
                    *slot = Some(hook);
                }
            });
        }
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
}

#[cfg(not(any(test, feature = "fault-injection")))]
mod disabled {
    use crate::engine::error::Result;

    /// No fault injection in this build.
    #[inline(always)]
    pub(crate) fn append_fault() -> Option<std::io::Error> {
        None
    }

    /// No fault injection in this build.
    #[inline(always)]
    pub(crate) fn sync_fault() -> Option<std::io::Error> {
        None
    }

    /// No fault injection in this build.
    #[inline(always)]
    pub(crate) fn commit_fault() -> Option<std::io::Error> {
        None
    }

    /// No fault injection in this build.
    #[inline(always)]
    pub(crate) fn write_fault() -> Option<std::io::Error> {
        None
    }

    /// No fault injection in this build.
    #[inline(always)]
    pub(crate) fn crash_point(_what: &'static str) -> Result<()> {
        Ok(())
    }
}
