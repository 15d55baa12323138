//! The control socket under bad input: malformed requests, oversized and slow lines,
//! vanished clients and many clients at once get clear errors, and the daemon keeps
//! answering everyone else. Runs on the host (no device: snapshots are crash-consistent).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snapblk::ctl::client::Client;
use snapblk::ctl::protocol::{
    CloneArgs, Command, ErrorCode, FreezeArgs, FreezeMode, NameArgs, ResizeArgs,
    SnapshotCreateArgs, MAX_LINE,
};
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

fn start(dir: &Path) -> (Server, Volume) {
    let vol = Volume::create(
        &dir.join("vol"),
        &CreateOptions {
            size: 1 << 20,
            block_size: 4096,
        },
    )
    .expect("create");
    let svc = Arc::new(VolumeService::new(vol.clone(), None, None, None));
    let server =
        Server::start(&dir.join("ctl.sock"), Access::default(), limits(), svc).expect("start");
    (server, vol)
}

fn raw(path: &Path, bytes: &[u8]) -> Value {
    let mut s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // A server that refuses the connection (busy) replies and closes without reading:
    // the write may then fail with EPIPE, and the reply is still there to read.
    let _ = s.write_all(bytes);
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
}

fn error_code(v: &Value) -> String {
    v["error"]["code"].as_str().unwrap_or("none").to_string()
}

#[test]
fn requests_round_trip_and_snapshots_are_idempotent() {
    let root = scratch();
    let (server, vol) = start(root.path());
    let mut c = Client::connect(server.path()).expect("connect");
    let st = c.call(Command::Status).expect("status");
    assert_eq!(st["volume"]["size"], json!(1 << 20));
    let create = |c: &mut Client, name: &str| {
        c.call(Command::SnapshotCreate(SnapshotCreateArgs {
            name: name.into(),
            freeze: FreezeMode::Auto,
            mount: None,
            freeze_timeout_ms: None,
        }))
    };
    let r = create(&mut c, "s1").expect("create");
    assert_eq!(r["created"], json!(true));
    assert!(
        r["consistency"]
            .as_str()
            .unwrap_or("")
            .starts_with("crash-consistent"),
        "{r}"
    );
    assert!(r["cut_ms"].as_f64().is_some());
    let again = create(&mut c, "s1").expect("same name again");
    assert_eq!(again["created"], json!(false));
    assert_eq!(again["snapshot"]["id"], r["snapshot"]["id"]);
    let e = create(&mut c, "../etc").expect_err("bad name");
    assert_eq!(e.code, ErrorCode::InvalidName);
    let list = c.call(Command::SnapshotList).expect("list");
    assert_eq!(list["snapshots"].as_array().map(Vec::len), Some(1));
    let e = c
        .call(Command::SnapshotShow(NameArgs {
            name: "nope".into(),
        }))
        .expect_err("missing");
    assert_eq!(e.code, ErrorCode::NotFound);
    c.call(Command::SnapshotDelete(NameArgs { name: "s1".into() }))
        .expect("delete");
    assert!(vol.list_snapshots().is_empty());
    // Counters for metrics: one snapshot cut (asking twice is one), none left now.
    let stats = c.call(Command::Stats).expect("stats");
    assert_eq!(stats["snapshots_created"], json!(1), "{stats}");
    assert_eq!(stats["snapshots"], json!(0), "{stats}");
    assert_eq!(stats["size_bytes"], json!(1 << 20), "{stats}");
    assert_eq!(stats["io"], json!({}), "no device, no requests: {stats}");
    let raw_stats = raw(server.path(), b"{\"v\":1,\"id\":9,\"cmd\":\"stats\"}\n");
    assert_eq!(raw_stats["id"], json!(9));
    assert!(
        raw_stats["result"]["freeze"]["counts"].is_array(),
        "{raw_stats}"
    );
    let e = c
        .call(Command::Freeze(FreezeArgs::default()))
        .expect_err("no device to freeze");
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = c
        .call(Command::Thaw(FreezeArgs::default()))
        .expect_err("nothing frozen");
    assert_eq!(e.code, ErrorCode::NotFound);
}

#[test]
fn malformed_requests_get_errors_and_the_connection_goes_on() {
    let root = scratch();
    let (server, _vol) = start(root.path());
    let p = server.path();
    assert_eq!(error_code(&raw(p, b"this is not json\n")), "bad_request");
    assert_eq!(
        error_code(&raw(p, b"{\"v\":9,\"cmd\":\"status\"}\n")),
        "unsupported_version"
    );
    assert_eq!(
        error_code(&raw(p, b"{\"v\":1,\"cmd\":\"format_disk\"}\n")),
        "unknown_command"
    );
    assert_eq!(error_code(&raw(p, b"\xff\xfe\n")), "bad_request");
    // Several requests on one connection, a bad one in the middle.
    let mut s = UnixStream::connect(p).expect("connect");
    s.write_all(b"{\"v\":1,\"id\":1,\"cmd\":\"status\"}\n[]\n{\"v\":1,\"id\":3,\"cmd\":\"snapshot.list\"}\n")
        .expect("write");
    let mut r = BufReader::new(s);
    let mut codes = vec![];
    for _ in 0..3 {
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        let v: Value = serde_json::from_str(&line).expect("json");
        codes.push((v["id"].clone(), error_code(&v)));
    }
    assert_eq!(
        codes,
        vec![
            (json!(1), "none".into()),
            (Value::Null, "bad_request".into()),
            (json!(3), "none".into())
        ]
    );
}

#[test]
fn oversized_and_slow_lines_are_cut_off() {
    let root = scratch();
    let (server, _vol) = start(root.path());
    let mut big = vec![b'x'; MAX_LINE + 10];
    big.push(b'\n');
    assert_eq!(error_code(&raw(server.path(), &big)), "line_too_long");
    // A client that starts a line and stalls gets a timeout, and others are served meanwhile.
    let mut slow = UnixStream::connect(server.path()).expect("connect");
    slow.write_all(b"{\"v\":1,").expect("write");
    let t = Instant::now();
    let mut c = Client::connect(server.path()).expect("connect");
    c.call(Command::Status)
        .expect("status while a client stalls");
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "a stalled client delayed another"
    );
    slow.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut line = String::new();
    BufReader::new(slow).read_line(&mut line).expect("read");
    assert!(line.contains("\"timeout\""), "{line}");
}

#[test]
fn vanished_and_excess_clients_do_not_disturb_the_daemon() {
    let root = scratch();
    let (server, _vol) = start(root.path());
    // Clients that send half a request, or a request, and vanish.
    for i in 0..20 {
        let mut s = UnixStream::connect(server.path()).expect("connect");
        if i % 2 == 0 {
            let _ = s.write_all(b"{\"v\":1,\"cmd\":\"snap");
        } else {
            let _ = s.write_all(b"{\"v\":1,\"cmd\":\"snapshot.list\"}\n");
        }
    }
    // Let those connections end, then fill every slot, then one more: it is told to retry.
    std::thread::sleep(Duration::from_millis(200));
    let held: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(server.path()).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let v = raw(server.path(), b"{\"v\":1,\"cmd\":\"status\"}\n");
    let code = error_code(&v);
    assert_eq!(code, "busy", "{v}");
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    let mut c = Client::connect(server.path()).expect("connect");
    c.call(Command::Status).expect("status after the storm");
}

#[test]
fn a_second_daemon_cannot_steal_a_live_socket_and_a_stale_one_is_replaced() {
    let root = scratch();
    let (server, vol) = start(root.path());
    let svc = Arc::new(VolumeService::new(vol.clone(), None, None, None));
    let e = Server::start(server.path(), Access::default(), limits(), svc.clone())
        .err()
        .expect("stole the socket");
    assert_eq!(e.code, ErrorCode::Busy);
    let path = server.path().to_path_buf();
    drop(server);
    assert!(!path.exists(), "socket left behind");
    // A stale socket file (no listener) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    drop(stale);
    let s2 = Server::start(&path, Access::default(), limits(), svc).expect("replace stale socket");
    let mode = std::fs::metadata(s2.path())
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o600));
    let mut buf = [0u8; 1];
    let mut s = UnixStream::connect(s2.path()).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    assert!(s.read(&mut buf).is_err(), "the server spoke first");
}

#[test]
fn access_rules() {
    let a = Access {
        uids: vec![1000],
        gids: vec![2000],
    };
    assert!(a.allows(0, 0));
    assert!(a.allows(1000, 5));
    assert!(a.allows(7, 2000));
    assert!(!a.allows(7, 8));
    assert!(!Access::default().allows(1000, 1000));
}

fn pattern_block(seed: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (i.wrapping_mul(131) ^ seed.wrapping_mul(7919)) as u8)
        .collect()
}

#[test]
fn export_streams_a_served_volume_and_import_rebuilds_it() {
    let root = scratch();
    let (server, vol) = start(root.path());
    for b in 0..64u64 {
        vol.write(b * 4096, &pattern_block(b), false)
            .expect("write");
    }
    vol.create_snapshot("s1").expect("s1");
    for b in (0..64u64).step_by(3) {
        vol.write(b * 4096, &pattern_block(b + 1000), false)
            .expect("write");
    }
    vol.discard(40 * 4096, 8 * 4096).expect("discard");
    vol.create_snapshot("s2").expect("s2");
    // The live volume moves on meanwhile; the streams must not see it.
    vol.write(0, &pattern_block(99_999), false).expect("write");

    let fetch = |snapshot: &str, since: Option<&str>| -> Vec<u8> {
        let c = Client::connect(server.path()).expect("connect");
        let (head, input) = c
            .export(snapblk::ctl::protocol::ExportArgs {
                snapshot: snapshot.into(),
                since: since.map(Into::into),
            })
            .expect("export");
        assert_eq!(head["stream"]["snapshot"], json!(snapshot));
        let (bytes, summary) = snapblk::stream::relay_stream(
            input,
            Vec::new(),
            "daemon",
            "memory",
            &snapblk::stream::NoProgress,
        )
        .expect("a whole, sound stream");
        assert_eq!(summary.stream_bytes, bytes.len() as u64);
        assert_eq!(
            head["stream"]["data_bytes"],
            json!(summary.trailer.data_bytes)
        );
        bytes
    };
    let full = fetch("s1", None);
    let inc = fetch("s2", Some("s1"));
    assert!(inc.len() < full.len(), "the incremental carries less");

    let target = root.path().join("restored");
    snapblk::stream::import_streams(
        &target,
        vec![
            snapblk::stream::StreamInput::new("full", &full[..]),
            snapblk::stream::StreamInput::new("inc", &inc[..]),
        ],
        &snapblk::stream::NoProgress,
    )
    .expect("import");
    let restored = Volume::open(&target).expect("open restored");
    for snap in ["s1", "s2"] {
        let mut want = vec![0u8; 1 << 20];
        let mut got = vec![0u8; 1 << 20];
        vol.read_snapshot(snap, 0, &mut want).expect("source");
        restored.read_snapshot(snap, 0, &mut got).expect("restored");
        assert!(want == got, "snapshot {snap} differs after the round trip");
    }

    // An unknown snapshot is an ordinary error reply, not a stream.
    let c = Client::connect(server.path()).expect("connect");
    let e = c
        .export(snapblk::ctl::protocol::ExportArgs {
            snapshot: "nope".into(),
            since: None,
        })
        .err()
        .expect("refused");
    assert_eq!(e.code, ErrorCode::NotFound);
    // The daemon still answers.
    let mut c = Client::connect(server.path()).expect("connect");
    c.call(Command::Status).expect("status");
}

#[test]
fn exports_pin_their_snapshots_and_are_limited() {
    let root = scratch();
    let vol = Volume::create(
        &root.path().join("vol"),
        &CreateOptions {
            size: 1 << 20,
            block_size: 4096,
        },
    )
    .expect("create");
    vol.write(0, &pattern_block(1), false).expect("write");
    vol.create_snapshot("a").expect("a");
    vol.create_snapshot("b").expect("b");
    let svc = VolumeService::new(vol.clone(), None, None, None);
    let args = |s: &str, since: Option<&str>| snapblk::ctl::protocol::ExportArgs {
        snapshot: s.into(),
        since: since.map(Into::into),
    };
    let j1 = svc.prepare_export(&args("b", Some("a"))).expect("first");
    let j2 = svc.prepare_export(&args("a", None)).expect("second");
    let e = svc
        .prepare_export(&args("a", None))
        .err()
        .expect("a third at once is refused");
    assert_eq!(e.code, ErrorCode::Busy);
    for name in ["a", "b"] {
        let e = svc
            .handle(1, Command::SnapshotDelete(NameArgs { name: name.into() }))
            .expect_err("pinned");
        assert_eq!(e.code, ErrorCode::Busy);
        assert!(e.message.contains("being exported"), "{}", e.message);
    }
    drop(j1);
    // "b" is free again; "a" is still read by the second export.
    svc.handle(1, Command::SnapshotDelete(NameArgs { name: "b".into() }))
        .expect("delete b");
    assert!(svc
        .handle(1, Command::SnapshotDelete(NameArgs { name: "a".into() }))
        .is_err());
    drop(j2);
    svc.handle(1, Command::SnapshotDelete(NameArgs { name: "a".into() }))
        .expect("delete a");
}

#[test]
fn a_served_volume_clones_and_grows_through_the_socket() {
    let root = scratch();
    let (server, vol) = start(root.path());
    let mut c = Client::connect(server.path()).expect("connect");
    vol.write(0, &pattern_block(1), false).expect("write");
    vol.write(4096 * 200, &pattern_block(2), false)
        .expect("write");
    c.call(Command::SnapshotCreate(SnapshotCreateArgs {
        name: "s1".into(),
        freeze: FreezeMode::None,
        mount: None,
        freeze_timeout_ms: None,
    }))
    .expect("snapshot");
    // Changes after the snapshot do not reach the clone.
    vol.write(0, &pattern_block(3), false).expect("write");

    let clone = |c: &mut Client, name: &str, dir: &str| {
        c.call(Command::SnapshotClone(CloneArgs {
            name: name.into(),
            dir: dir.into(),
        }))
    };
    let dir = root.path().join("restored");
    let dir_s = dir.to_string_lossy().into_owned();
    let r = clone(&mut c, "s1", &dir_s).expect("clone while served");
    assert_eq!(r["snapshot"], "s1");
    assert_eq!(r["dir"], json!(dir_s));
    let new_id = r["volume_id"].as_str().expect("volume id").to_string();
    assert_ne!(new_id, vol.id());

    // Refusals: the folder exists, a relative folder, no such snapshot, a bad name.
    let e = clone(&mut c, "s1", &dir_s).expect_err("exists");
    assert_eq!(e.code, ErrorCode::AlreadyExists);
    let e = clone(&mut c, "s1", "relative/dir").expect_err("relative");
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("absolute"), "{}", e.message);
    let other = root.path().join("other").to_string_lossy().into_owned();
    let e = clone(&mut c, "nope", &other).expect_err("no snapshot");
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = clone(&mut c, "../x", &other).expect_err("bad name");
    assert_eq!(e.code, ErrorCode::InvalidName);
    assert!(!Path::new(&other).exists());

    // Grow the served volume; the snapshot (and a clone of it) keeps its size.
    let r = c
        .call(Command::VolumeResize(ResizeArgs { size: 2 << 20 }))
        .expect("grow");
    assert_eq!(r, json!({ "size": 2 << 20, "device_resized": false }));
    let st = c.call(Command::Status).expect("status");
    assert_eq!(st["volume"]["size"], json!(2 << 20));
    let e = c
        .call(Command::VolumeResize(ResizeArgs { size: 1 << 20 }))
        .expect_err("shrink");
    assert_eq!(e.code, ErrorCode::BadRequest);
    let show = c
        .call(Command::SnapshotShow(NameArgs { name: "s1".into() }))
        .expect("show");
    assert_eq!(show["snapshot"]["size"], json!(1 << 20));

    // The clone, closed by the daemon, opens here and reads as the snapshot.
    let restored = Volume::open(&dir).expect("the clone opens");
    assert_eq!(restored.id(), new_id);
    assert_eq!(restored.size(), 1 << 20);
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    restored.read(0, &mut a).expect("read clone");
    vol.read_snapshot("s1", 0, &mut b).expect("read snapshot");
    assert!(a == b, "the clone differs from the snapshot");
    assert_eq!(&a[..4096], &pattern_block(1)[..]);
    drop(server);
}
