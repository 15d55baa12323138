//! The command line's output: a reader that goes away (`snapblk volume status X | head -1`)
//! ends the command quietly, as with other tools, with nothing lost and no panic.

mod common;

use std::process::{Command, Stdio};

use common::scratch;

/// Runs `snapblk` with `args`, its standard output a pipe whose reader is already closed.
fn run_into_closed_pipe(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_snapblk"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run snapblk")
}

/// `what` exited 0 without a panic.
fn ended_quietly(out: &std::process::Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} into a closed pipe: {:?}, {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{what} panicked: {stderr}");
}

#[test]
fn a_closed_output_ends_the_command_quietly() {
    let root = scratch();
    let dir = root.path().join("vol");
    let out = run_into_closed_pipe(&[
        "volume".as_ref(),
        "create".as_ref(),
        dir.as_os_str(),
        "--size".as_ref(),
        "8M".as_ref(),
    ]);
    ended_quietly(&out, "create");
    // The volume was made although its message could not be printed.
    let out = run_into_closed_pipe(&["volume".as_ref(), "status".as_ref(), dir.as_os_str()]);
    ended_quietly(&out, "status");
    let out = Command::new(env!("CARGO_BIN_EXE_snapblk"))
        .args(["volume".as_ref(), "status".as_ref(), dir.as_os_str()])
        .output()
        .expect("run snapblk");
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty(), "status printed nothing");
}
