//! SIGTERM / SIGINT handling without handlers: the signals are blocked in every thread
//! (so no queue thread is ever interrupted) and the main thread collects them with a
//! timed wait between checks of the queues' health.

use std::time::Duration;

use super::error::{Result, UblkLayerError};

/// The signals that ask the daemon to stop.
fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, live sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    set
}

/// Blocks SIGTERM and SIGINT in the calling thread and in every thread it starts
/// afterwards. Call before any thread is spawned.
pub fn block_stop_signals() -> Result<()> {
    let set = stop_set();
    // SAFETY: both pointers are valid for the call (old mask not wanted).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(UblkLayerError::Sys {
            op: "block SIGTERM/SIGINT",
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// Waits up to `timeout` for SIGTERM or SIGINT (blocked beforehand); returns it.
pub fn wait_stop_signal(timeout: Duration) -> Option<i32> {
    let set = stop_set();
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` and `ts` are valid for the call; no siginfo is requested.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Name of a stop signal, for logs.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_a_blocked_signal() {
        // Run in a fresh thread so the test harness's threads keep their masks.
        let h = std::thread::spawn(|| {
            block_stop_signals().expect("block");
            assert_eq!(wait_stop_signal(Duration::from_millis(10)), None);
            // SAFETY: sends SIGINT to this very thread, where it is blocked.
            let rc = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGINT) };
            assert_eq!(rc, 0);
            wait_stop_signal(Duration::from_secs(1))
        });
        assert_eq!(h.join().expect("join"), Some(libc::SIGINT));
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
    }
}
