//! Who reaches which daemon: commands reach exactly the volume they name (a daemon of
//! another volume behind the socket is refused), a daemon that cannot have its control
//! socket does not serve, and the users allowed with `--allow-uid`/`--allow-gid` can
//! connect while everyone else is refused. Runs on the host; the access tests need root
//! (to run clients as other users) and skip otherwise.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use snapblk::ctl::server::{Access, Limits, Server};
use snapblk::ctl::service::VolumeService;
use snapblk::engine::{CreateOptions, Volume};

use common::scratch;

fn limits() -> Limits {
    Limits {
        max_clients: 8,
        line_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(2),
    }
}

fn create(dir: &Path) -> Volume {
    Volume::create(
        dir,
        &CreateOptions {
            size: 1 << 20,
            block_size: 4096,
        },
    )
    .expect("create")
}

fn serve(vol: &Volume, sock: &Path, access: Access) -> Server {
    let svc = Arc::new(VolumeService::new(vol.clone(), None, None, None));
    Server::start(sock, access, limits(), svc).expect("start")
}

fn snapblk(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_snapblk"));
    c.args(args).env("RUST_LOG", "off");
    c
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `-V /b/vol1` must not reach the daemon of `/a/vol1`, even through its socket; the
/// right folder, and the bare name of a served volume, do reach it.
#[test]
fn a_command_reaches_only_the_volume_it_names() {
    let root = scratch();
    let (a, b) = (root.path().join("a/vol1"), root.path().join("b/vol1"));
    std::fs::create_dir_all(root.path().join("a")).expect("mkdir");
    std::fs::create_dir_all(root.path().join("b")).expect("mkdir");
    let va = create(&a);
    let vb = create(&b);
    let sock = root.path().join("a.sock");
    let _server = serve(&va, &sock, Access::default());
    let out = snapblk(&["status", "-V", s(&b), "--socket", s(&sock), "-o", "json"])
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "reached the wrong volume: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not the volume"), "{}", text(&out));
    assert!(
        err.contains(&va.id()),
        "the refusal names what it found: {}",
        text(&out)
    );
    // A folder of another name is refused too; the right folder and the name pass.
    let out = snapblk(&["status", "-V", "vol2", "--socket", s(&sock)])
        .output()
        .expect("run");
    assert!(!out.status.success(), "{}", text(&out));
    for v in [s(&a), "vol1"] {
        let out = snapblk(&["status", "-V", v, "--socket", s(&sock), "-o", "json"])
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&va.id()),
            "{}",
            text(&out)
        );
    }
    drop(vb);
}

/// A daemon whose control socket is taken by another live daemon refuses to start
/// (before it would add a device: the message is about the socket, not the driver).
#[test]
fn a_daemon_without_its_socket_does_not_serve() {
    let root = scratch();
    let dir = root.path().join("vol");
    let vol = create(&dir);
    let sock = root.path().join("taken.sock");
    let _other = serve(&vol, &sock, Access::default());
    drop(vol);
    let out = snapblk(&["serve", s(&dir), "--socket", s(&sock)])
        .output()
        .expect("run");
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another daemon"), "{}", text(&out));
    assert!(sock.exists(), "the other daemon's socket was removed");
    // A path that is no socket is not replaced either.
    let file = root.path().join("plain");
    std::fs::write(&file, "keep").expect("write");
    let out = snapblk(&["serve", s(&dir), "--socket", s(&file)])
        .output()
        .expect("run");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a socket"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&file).ok().as_deref(), Some("keep"));
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `snapblk status` as `uid`/`gid` against `sock` (std drops root's supplementary
/// groups when it changes the uid).
fn status_as(uid: u32, gid: u32, sock: &Path) -> Output {
    let mut c = snapblk(&["status", "-V", "vol", "--socket", s(sock), "-o", "json"]);
    c.uid(uid).gid(gid).current_dir("/");
    c.output().expect("run")
}

/// A scratch folder other users can traverse, for sockets they must reach.
fn open_scratch() -> (tempfile::TempDir, PathBuf) {
    let root = scratch();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let p = root.path().to_path_buf();
    (root, p)
}

#[test]
fn allowed_uids_connect_and_others_are_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to run clients as other users");
        return;
    }
    let (_root, dir) = open_scratch();
    let vol = create(&dir.join("vol"));
    let sock = dir.join("ctl.sock");
    let _server = serve(
        &vol,
        &sock,
        Access {
            uids: vec![64011, 64012],
            gids: vec![],
        },
    );
    for uid in [64011, 64012] {
        let out = status_as(uid, 64099, &sock);
        assert!(out.status.success(), "allowed uid {uid}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&vol.id()));
    }
    let out = status_as(64013, 64099, &sock);
    assert!(!out.status.success(), "refused uid got in: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 64013") && err.contains("not allowed"),
        "{}",
        text(&out)
    );
    // The daemon's own check stands even if the file's permissions are opened up.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = status_as(64013, 64099, &sock);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("may not use this control socket"),
        "{}",
        text(&out)
    );
}

#[test]
fn an_allowed_group_connects_and_others_are_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to run clients as other users");
        return;
    }
    let (_root, dir) = open_scratch();
    let vol = create(&dir.join("vol"));
    let sock = dir.join("ctl.sock");
    let _server = serve(
        &vol,
        &sock,
        Access {
            uids: vec![],
            gids: vec![64020],
        },
    );
    let md = std::fs::metadata(&sock).expect("stat");
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&md), 64020);
    let out = status_as(64021, 64020, &sock);
    assert!(out.status.success(), "allowed group: {}", text(&out));
    let out = status_as(64022, 64023, &sock);
    assert!(
        !out.status.success(),
        "refused group got in: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not allowed"),
        "{}",
        text(&out)
    );
}
