//! Behaviour of the engine that a user or an operator relies on: errors instead of
//! panics, damaged files named, space given back, clones independent of their source.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use snapblk::engine::{CreateOptions, EngineError, Extent, Volume};

use common::{block_data, scratch};

const MIB: u64 = 1 << 20;

/// A new volume whose head prepares no space ahead (so disk usage counts only data).
fn create(dir: &Path, size: u64) -> Volume {
    let v = Volume::create(
        dir,
        &CreateOptions {
            size,
            block_size: 4096,
        },
    )
    .expect("create");
    v.set_head_reserve(Some(0));
    v
}

/// Bytes actually allocated on disk by the volume's layer files.
fn disk_usage(dir: &Path) -> u64 {
    fs::read_dir(dir.join("layers"))
        .expect("layers")
        .map(|e| e.expect("entry").metadata().expect("stat").blocks() * 512)
        .sum()
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let root = scratch();
    let v = create(&root.path().join("v"), MIB);
    let mut buf = vec![0u8; 4096];
    for (off, len) in [
        (MIB, 4096u64),
        (MIB - 4096, 8192),
        (u64::MAX - 4095, 4096),
        (100, 4096),
        (0, 100),
    ] {
        let e = v.plan_read(off, len).err().expect("bad read accepted");
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
        assert!(v.begin_write(off, len).is_err());
        assert!(v.discard(off, len).is_err());
        assert!(v.write_zeroes(off, len).is_err());
    }
    assert!(v.read(MIB, &mut buf).is_err());
    assert!(v.write(4095, &buf, false).is_err());
    let e = v.read(MIB, &mut buf).expect_err("error").to_string();
    assert!(e.contains("past the end"), "{e}");
    // Zero-length requests at a valid offset are no-ops.
    v.read(0, &mut []).expect("empty read");
    v.discard(0, 0).expect("empty discard");
}

#[test]
fn bad_geometry_is_refused() {
    let root = scratch();
    for (size, bs) in [
        (0u64, 4096u32),
        (4097, 4096),
        (MIB, 1024),
        (MIB, 0),
        (4096 * (1 << 32) + 4096, 4096),
    ] {
        let r = Volume::create(
            &root.path().join(format!("v{size}-{bs}")),
            &CreateOptions {
                size,
                block_size: bs,
            },
        );
        assert!(
            matches!(r, Err(EngineError::Invalid(_))),
            "size {size} bs {bs} accepted"
        );
    }
    Volume::create(
        &root.path().join("small"),
        &CreateOptions {
            size: 512 * 3,
            block_size: 512,
        },
    )
    .expect("512-byte blocks");
    let dir = root.path().join("exists");
    create(&dir, MIB);
    assert!(matches!(
        Volume::create(
            &dir,
            &CreateOptions {
                size: MIB,
                block_size: 4096
            }
        ),
        Err(EngineError::AlreadyExists { .. }) | Err(EngineError::Busy { .. })
    ));
}

#[test]
fn a_volume_is_opened_by_one_process_at_a_time() {
    let root = scratch();
    let dir = root.path().join("v");
    let v = create(&dir, MIB);
    let e = Volume::open(&dir).err().expect("second open allowed");
    assert!(matches!(e, EngineError::Busy { .. }), "{e}");
    drop(v);
    Volume::open(&dir).expect("open after close");
}

#[test]
fn damaged_files_give_clear_errors_naming_the_file() {
    let root = scratch();
    let dir = root.path().join("v");
    let v = create(&dir, MIB);
    v.write(0, &block_data(7, 4096), false).expect("write");
    v.create_snapshot("s1").expect("snapshot");
    v.write(4096, &block_data(8, 4096), true).expect("write");
    drop(v);
    let expect_err = |what: &str, needle: &str| {
        let e = Volume::open(&dir)
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"))
            .to_string();
        assert!(e.contains(needle), "{what}: {e}");
    };

    // Missing folder, folder without a volume.
    assert!(Volume::open(&root.path().join("none")).is_err());
    fs::create_dir(root.path().join("empty")).expect("mkdir");
    let e = Volume::open(&root.path().join("empty"))
        .err()
        .expect("empty dir opened")
        .to_string();
    assert!(e.contains("not a snapblk volume"), "{e}");

    // A flipped byte in the frozen layer's map.
    let map = dir.join("layers/1.map");
    let orig = fs::read(&map).expect("read");
    let f = fs::OpenOptions::new().write(true).open(&map).expect("open");
    f.write_all_at(&[orig[40] ^ 0xff], 40).expect("flip");
    expect_err("flipped map byte", "1.map");
    fs::write(&map, &orig).expect("restore");

    // A truncated frozen map (its seal is gone).
    fs::write(&map, &orig[..orig.len() - 4]).expect("truncate");
    expect_err("truncated frozen map", "1.map");
    fs::write(&map, &orig).expect("restore");

    // A truncated data file: it no longer holds the block its map names. (A frozen
    // layer's file may be shorter than the volume, which may have grown since.)
    let data = dir.join("layers/1.data");
    let first = fs::read(&data).expect("read")[..4096].to_vec();
    fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .expect("open")
        .set_len(2048)
        .expect("truncate");
    expect_err("short data file", "1.data");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .expect("open");
    f.set_len(MIB).expect("restore");
    f.write_all_at(&first, 0).expect("restore");

    // A missing layer file.
    fs::rename(&data, dir.join("layers/1.moved")).expect("move");
    expect_err("missing data file", "1.data");
    fs::rename(dir.join("layers/1.moved"), &data).expect("move back");

    // A damaged manifest.
    let manifest = dir.join("volume.json");
    let text = fs::read_to_string(&manifest).expect("read");
    fs::write(&manifest, text.replace("\"s1\"", "\"s2\"")).expect("edit");
    expect_err("edited manifest", "volume.json");
    fs::write(&manifest, "garbage").expect("garbage");
    expect_err("garbage manifest", "volume.json");
    fs::write(&manifest, &text).expect("restore");

    let v = Volume::open(&dir).expect("restored volume opens");
    let mut buf = vec![0u8; 8192];
    v.read(0, &mut buf).expect("read");
    assert_eq!(&buf[..4096], &block_data(7, 4096)[..]);
    assert_eq!(&buf[4096..], &block_data(8, 4096)[..]);
}

#[test]
fn snapshot_names_are_checked_and_unique() {
    let root = scratch();
    let v = create(&root.path().join("v"), MIB);
    for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(129)] {
        assert!(
            matches!(v.create_snapshot(bad), Err(EngineError::InvalidName(_))),
            "{bad:?} accepted"
        );
    }
    v.create_snapshot("daily-2026.11.21_a").expect("good name");
    assert!(matches!(
        v.create_snapshot("daily-2026.11.21_a"),
        Err(EngineError::SnapshotExists(_))
    ));
    assert!(matches!(
        v.delete_snapshot("nope"),
        Err(EngineError::SnapshotNotFound(_))
    ));
    assert!(v
        .changed_extents("daily-2026.11.21_a", "daily-2026.11.21_a")
        .is_err());
}

#[test]
fn snapshots_copy_nothing_and_deleting_gives_space_back() {
    let root = scratch();
    let dir = root.path().join("v");
    let v = create(&dir, 64 * MIB);
    let chunk: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8 + 1).collect();
    for i in 0..16 {
        v.write(i * MIB, &chunk, false).expect("write");
    }
    v.flush().expect("flush");
    let before = disk_usage(&dir);
    v.create_snapshot("s1").expect("snapshot");
    assert!(
        disk_usage(&dir) < before + MIB / 4,
        "taking a snapshot copied data"
    );
    // Overwrite everything: the head now holds 16 MiB more.
    for i in 0..16 {
        v.write(i * MIB, &chunk, false).expect("overwrite");
    }
    v.create_snapshot("s2").expect("snapshot");
    let with_two = disk_usage(&dir);
    assert!(
        with_two >= before + 15 * MIB,
        "overwrites not stored: {with_two}"
    );
    v.delete_snapshot("s1").expect("delete");
    let after = disk_usage(&dir);
    assert!(
        after + 15 * MIB <= with_two,
        "delete gave back {} bytes",
        with_two - after
    );
    let mut buf = vec![0u8; MIB as usize];
    v.read_snapshot("s2", 3 * MIB, &mut buf).expect("read");
    assert_eq!(buf, chunk);
}

#[test]
fn deleting_the_newest_snapshot_frees_what_the_live_volume_overwrote() {
    let root = scratch();
    let dir = root.path().join("v");
    let v = create(&dir, 64 * MIB);
    let chunk = vec![0x5au8; MIB as usize];
    for i in 0..8 {
        v.write(i * MIB, &chunk, false).expect("write");
    }
    v.create_snapshot("s1").expect("snapshot");
    for i in 0..8 {
        v.write(i * MIB, &chunk, false).expect("overwrite");
    }
    let before = disk_usage(&dir);
    v.delete_snapshot("s1").expect("delete");
    assert!(
        disk_usage(&dir) + 7 * MIB <= before,
        "overwritten blocks of the deleted snapshot were kept"
    );
    let mut buf = vec![0u8; MIB as usize];
    v.read(7 * MIB, &mut buf).expect("read");
    assert_eq!(buf, chunk);
}

#[test]
fn discard_frees_head_space_and_hides_older_data() {
    let root = scratch();
    let dir = root.path().join("v");
    let v = create(&dir, 16 * MIB);
    let chunk = vec![0xa5u8; 4 * MIB as usize];
    v.write(0, &chunk, false).expect("write");
    v.create_snapshot("s1").expect("snapshot");
    v.write(4 * MIB, &chunk, false).expect("write");
    let before = disk_usage(&dir);
    v.discard(2 * MIB, 4 * MIB).expect("discard");
    assert!(
        disk_usage(&dir) + 2 * MIB <= before,
        "discard did not punch the head"
    );
    let mut buf = vec![1u8; 8 * MIB as usize];
    v.read(0, &mut buf).expect("read");
    assert!(buf[..2 * MIB as usize].iter().all(|&b| b == 0xa5));
    assert!(
        buf[2 * MIB as usize..6 * MIB as usize]
            .iter()
            .all(|&b| b == 0),
        "discard did not hide the snapshot's data"
    );
    assert!(buf[6 * MIB as usize..].iter().all(|&b| b == 0xa5));
    v.read_snapshot("s1", 0, &mut buf[..4 * MIB as usize])
        .expect("snapshot read");
    assert!(
        buf[..4 * MIB as usize].iter().all(|&b| b == 0xa5),
        "discard changed the snapshot"
    );
}

#[test]
fn clones_are_independent_and_outlive_their_source() {
    let root = scratch();
    let src_dir = root.path().join("src");
    let v = create(&src_dir, 4 * MIB);
    v.write(0, &block_data(1, 4096), false).expect("write");
    v.create_snapshot("s1").expect("snapshot");
    let c = v
        .clone_snapshot("s1", &root.path().join("clone"))
        .expect("clone");
    c.write(0, &block_data(2, 4096), false)
        .expect("clone write");
    v.write(4096, &block_data(3, 4096), false)
        .expect("source write");
    let mut buf = vec![0u8; 8192];
    c.read(0, &mut buf).expect("read clone");
    assert_eq!(&buf[..4096], &block_data(2, 4096)[..]);
    assert_eq!(
        &buf[4096..],
        &block_data(0, 4096)[..],
        "source write visible in the clone"
    );
    v.read(0, &mut buf).expect("read source");
    assert_eq!(
        &buf[..4096],
        &block_data(1, 4096)[..],
        "clone write visible in the source"
    );

    // Delete the source snapshot, then the whole source volume: the clone still reads right.
    v.delete_snapshot("s1").expect("delete");
    drop(v);
    fs::remove_dir_all(&src_dir).expect("remove source");
    c.close().expect("close");
    let c = Volume::open(&root.path().join("clone")).expect("reopen clone");
    c.read(0, &mut buf).expect("read clone");
    assert_eq!(&buf[..4096], &block_data(2, 4096)[..]);
    assert_eq!(c.status().origin.map(|o| o.ends_with("/s1")), Some(true));
}

#[test]
fn changed_and_allocated_extents_are_exact_and_merged() {
    let root = scratch();
    let v = create(&root.path().join("v"), 4 * MIB);
    let b = |n: u64| n * 4096;
    v.write(b(0), &vec![1u8; 3 * 4096], false).expect("write");
    v.write(b(10), &vec![1u8; 4096], false).expect("write");
    v.create_snapshot("a").expect("snap");
    v.write(b(2), &vec![2u8; 2 * 4096], false).expect("write");
    v.discard(b(10), b(1)).expect("discard");
    v.create_snapshot("b").expect("snap");
    v.write(b(20), &vec![3u8; 4096], false).expect("write");
    v.create_snapshot("c").expect("snap");
    let ext = |o: u64, l: u64| Extent {
        offset: b(o),
        length: b(l),
    };
    assert_eq!(
        v.allocated_extents("a").expect("a"),
        vec![ext(0, 3), ext(10, 1)]
    );
    assert_eq!(v.allocated_extents("b").expect("b"), vec![ext(0, 4)]);
    assert_eq!(
        v.changed_extents("a", "b").expect("a..b"),
        vec![ext(2, 2), ext(10, 1)]
    );
    assert_eq!(
        v.changed_extents("a", "c").expect("a..c"),
        vec![ext(2, 2), ext(10, 1), ext(20, 1)]
    );
    assert!(
        v.changed_extents("c", "a").is_err(),
        "reverse order accepted"
    );
    v.delete_snapshot("b").expect("delete b");
    assert_eq!(
        v.changed_extents("a", "c").expect("a..c after delete"),
        vec![ext(2, 2), ext(10, 1), ext(20, 1)]
    );
}

#[test]
fn a_huge_sparse_volume_costs_nothing_until_written() {
    let root = scratch();
    let dir = root.path().join("v");
    let v = create(&dir, 1 << 40);
    v.write((1 << 40) - 4096, &block_data(9, 4096), false)
        .expect("write last block");
    v.create_snapshot("s").expect("snapshot");
    assert!(
        disk_usage(&dir) < MIB,
        "a 1 TiB volume allocated {} bytes",
        disk_usage(&dir)
    );
    let mut buf = vec![0u8; 4096];
    v.read_snapshot("s", (1 << 40) - 4096, &mut buf)
        .expect("read");
    assert_eq!(buf, block_data(9, 4096));
    assert!(v.status().map_bytes < 4096);
}

/// The daemon opens volumes with O_DIRECT: every engine path (writes from unaligned
/// buffers, reads, snapshots, merges that copy data, discards, clones) must still work
/// and read back exactly, and reopening without direct I/O sees the same bytes.
#[test]
fn direct_io_volumes_behave_like_buffered_ones() {
    use snapblk::engine::VolumeOpenOptions;
    let root = scratch();
    let dir = root.path().join("vol");
    drop(create(&dir, 4 * MIB));
    let v = Volume::open_with(&dir, &VolumeOpenOptions { direct: true }).expect("open");
    // tmpfs (the scratch folder) takes O_DIRECT for 4 KiB blocks on Linux 6.6+.
    let direct = v.direct_io();
    if !direct {
        eprintln!("note: this file system refused O_DIRECT; the test ran with the page cache");
    }
    let blocks = 4 * MIB / 4096;
    let mut model = vec![0u64; blocks as usize];
    // Unaligned source buffers: a Vec with one byte of offset.
    let write = |v: &Volume, model: &mut Vec<u64>, b: u64, n: u64, ver: u64| {
        let mut raw = vec![0u8; (n * 4096) as usize + 1];
        for i in 0..n {
            let d = block_data(ver + i, 4096);
            raw[1 + (i * 4096) as usize..1 + ((i + 1) * 4096) as usize].copy_from_slice(&d);
        }
        v.write(b * 4096, &raw[1..], false).expect("write");
        for i in 0..n {
            model[(b + i) as usize] = ver + i;
        }
    };
    write(&v, &mut model, 0, 64, 100);
    v.create_snapshot("a").expect("a");
    write(&v, &mut model, 10, 20, 1000);
    v.discard(40 * 4096, 8 * 4096).expect("discard");
    model[40..48].fill(0);
    v.create_snapshot("b").expect("b");
    write(&v, &mut model, 30, 40, 5000);
    // Deleting "a" merges it into "b"'s layer (a data copy); "b" reads as before.
    let mut before = vec![0u8; 4 * MIB as usize];
    v.read_snapshot("b", 0, &mut before).expect("read b");
    v.delete_snapshot("a").expect("delete a");
    let mut after = vec![0u8; 4 * MIB as usize];
    v.read_snapshot("b", 0, &mut after).expect("read b again");
    assert!(
        before == after,
        "snapshot b changed when a was merged (direct={direct})"
    );
    v.flush().expect("flush");
    let mut live = vec![0u8; 4 * MIB as usize];
    v.read(0, &mut live).expect("read");
    for (b, want) in model.iter().enumerate() {
        let got = &live[b * 4096..(b + 1) * 4096];
        assert!(
            got == block_data(*want, 4096),
            "block {b} (direct={direct})"
        );
    }
    v.close().expect("close");
    let again = Volume::open(&dir).expect("reopen buffered");
    let mut check = vec![0u8; 4 * MIB as usize];
    again.read(0, &mut check).expect("read");
    assert!(check == live, "a buffered reopen reads other bytes");
}

#[test]
fn a_completed_write_says_when_a_flush_is_due() {
    let tmp = scratch();
    let vol = create(&tmp.path().join("v"), 64 * MIB);
    let blocks = 64 * MIB / 4096;
    // Unflushed changes pile up in the volatile journal; past half of it, the write
    // that crosses the line says so (a server then flushes in the background).
    let mut writes = 0u64;
    loop {
        let ticket = vol
            .begin_write((writes % blocks) * 4096, 4096)
            .expect("begin");
        writes += 1;
        if ticket.complete().expect("complete") {
            break;
        }
        assert!(writes <= 1 << 20, "no flush advised after {writes} writes");
    }
    // Half the ring of the default 4 MiB budget: about 87 000 changes.
    assert!(writes > 80_000, "flush advised after only {writes} writes");
    assert!(vol.flush_advised(), "the volume agrees with the write");
    vol.flush().expect("flush");
    assert!(!vol.flush_advised());
    let ticket = vol.begin_write(0, 4096).expect("begin");
    assert!(
        !ticket.complete().expect("complete"),
        "no flush due right after one"
    );
}

#[test]
fn a_volume_grows_and_its_snapshots_and_clones_keep_their_size() {
    let root = scratch();
    let dir = root.path().join("v");
    let v = create(&dir, MIB);
    v.write(0, &block_data(1, 4096), false).expect("write");
    v.create_snapshot("before").expect("snapshot");

    // Same size: nothing to do. Smaller, unaligned or too large: refused, nothing changes.
    v.resize(MIB).expect("same size");
    for bad in [
        MIB / 2,
        2 * MIB + 100,
        4096 * (snapblk::engine::MAX_BLOCKS + 1),
    ] {
        let e = v.resize(bad).expect_err("refused");
        assert!(matches!(e, EngineError::Invalid(_)), "{e}");
        assert_eq!(v.size(), MIB);
    }
    let e = v.resize(MIB / 2).expect_err("shrink").to_string();
    assert!(e.contains("shrink"), "{e}");

    v.resize(4 * MIB).expect("grow");
    assert_eq!(v.size(), 4 * MIB);
    assert_eq!(v.status().size, 4 * MIB);
    // The new blocks read as zeros and take writes; the old data is still there.
    let mut buf = vec![0u8; 4096];
    v.read(3 * MIB, &mut buf).expect("read the new end");
    assert!(buf.iter().all(|&b| b == 0));
    v.write(4 * MIB - 4096, &block_data(2, 4096), false)
        .expect("write at the new end");
    v.read(0, &mut buf).expect("read");
    assert_eq!(buf, block_data(1, 4096));
    assert!(v.read(4 * MIB, &mut buf).is_err(), "past the new end");

    // The snapshot taken before keeps its size, for reads too.
    let info = v.snapshot_info("before").expect("info");
    assert_eq!(info.size, MIB);
    assert_eq!(v.snapshot_view("before").expect("view").size(), MIB);
    assert!(v.read_snapshot("before", MIB, &mut buf).is_err());
    v.create_snapshot("after").expect("snapshot");
    assert_eq!(v.snapshot_info("after").expect("info").size, 4 * MIB);
    let mut end = vec![0u8; 4096];
    v.read_snapshot("after", 4 * MIB - 4096, &mut end)
        .expect("read");
    assert_eq!(end, block_data(2, 4096));

    // A clone of the older snapshot has its size; one of the newer, the new size.
    let c1 = v
        .clone_snapshot("before", &root.path().join("c1"))
        .expect("clone");
    assert_eq!(c1.size(), MIB);
    c1.read(0, &mut buf).expect("read clone");
    assert_eq!(buf, block_data(1, 4096));
    let c2 = v
        .clone_snapshot("after", &root.path().join("c2"))
        .expect("clone");
    assert_eq!(c2.size(), 4 * MIB);
    c1.close().expect("close");
    c2.close().expect("close");
    // A clone can grow on its own.
    let c1 = Volume::open(&root.path().join("c1")).expect("open");
    c1.resize(2 * MIB).expect("grow the clone");
    c1.close().expect("close");
    assert_eq!(
        Volume::open(&root.path().join("c1")).expect("open").size(),
        2 * MIB
    );

    // Deleting the old snapshot merges it into the newer one: sizes stay right.
    v.delete_snapshot("before").expect("delete");
    v.close().expect("close");
    let v = Volume::open(&dir).expect("reopen");
    assert_eq!(v.size(), 4 * MIB);
    assert_eq!(v.snapshot_info("after").expect("info").size, 4 * MIB);
    v.read(4 * MIB - 4096, &mut end).expect("read");
    assert_eq!(end, block_data(2, 4096));
}

#[test]
fn snapshots_of_manifests_without_sizes_keep_the_old_size_after_a_grow() {
    let root = scratch();
    let dir = root.path().join("v");
    let v = create(&dir, MIB);
    v.create_snapshot("old").expect("snapshot");
    v.close().expect("close");
    // Rewrite the manifest as a build that did not record snapshot sizes would have.
    let path = dir.join("volume.json");
    let text = fs::read_to_string(&path).expect("read");
    let body = text.lines().next().expect("body");
    let mut m: serde_json::Value = serde_json::from_str(body).expect("json");
    for s in m["snapshots"].as_array_mut().expect("snapshots") {
        s.as_object_mut().expect("object").remove("size");
    }
    let body = m.to_string();
    fs::write(
        &path,
        format!("{body}\ncrc32c {:08x}\n", crc32c::crc32c(body.as_bytes())),
    )
    .expect("write");
    let v = Volume::open(&dir).expect("open an old manifest");
    assert_eq!(v.snapshot_info("old").expect("info").size, MIB);
    v.resize(2 * MIB).expect("grow");
    v.close().expect("close");
    let v = Volume::open(&dir).expect("reopen");
    assert_eq!(v.snapshot_info("old").expect("info").size, MIB);
    assert_eq!(v.size(), 2 * MIB);
}

#[test]
fn a_grow_interrupted_at_any_step_leaves_the_old_or_the_new_size() {
    use snapblk::engine::faults;
    let root = scratch();
    for step in 1..=4 {
        let dir = root.path().join(format!("v{step}"));
        let v = create(&dir, MIB);
        v.write(0, &block_data(7, 4096), true).expect("write");
        faults::crash_after(step);
        let r = v.resize(2 * MIB);
        faults::disarm();
        drop(v);
        let v = Volume::open(&dir).expect("reopen");
        assert!(
            v.size() == MIB || v.size() == 2 * MIB,
            "step {step}: {}",
            v.size()
        );
        if r.is_ok() {
            assert_eq!(v.size(), 2 * MIB, "step {step}");
        }
        // An identity head's file has the volume's size; a slotted one's follows its
        // slots (tests/engine_layouts.rs covers the identity layout).
        let len = fs::metadata(dir.join("layers/1.data")).expect("stat").len();
        if !v.status().slotted_head {
            assert_eq!(
                len,
                v.size(),
                "step {step}: the head file has the volume's size"
            );
        }
        let mut buf = vec![0u8; 4096];
        v.read(0, &mut buf).expect("read");
        assert_eq!(buf, block_data(7, 4096));
        v.read(v.size() - 4096, &mut buf).expect("read the end");
    }
    // A real crash between extending the head's file and the commit (the injected one
    // above undoes the extension): the open cuts the file back to the volume's size.
    let dir = root.path().join("torn");
    create(&dir, MIB).close().expect("close");
    let head = dir.join("layers/1.data");
    fs::OpenOptions::new()
        .write(true)
        .open(&head)
        .and_then(|f| f.set_len(3 * MIB))
        .expect("extend");
    let v = Volume::open(&dir).expect("open");
    assert_eq!(v.size(), MIB);
    if !v.status().slotted_head {
        assert_eq!(fs::metadata(&head).expect("stat").len(), MIB);
    }
}

/// Linux reports a failed writeback once per open file: a second fdatasync may succeed
/// although the data never reached the disk. A volume whose data sync failed must fail
/// every later flush (a FLUSH, a snapshot's) until it is reopened, and say why.
#[test]
fn a_failed_data_sync_fails_every_later_flush_until_reopened() {
    let tmp = scratch();
    let dir = tmp.path().join("v");
    let v = create(&dir, 1 << 20);
    v.write(0, &block_data(1, 4096), false).expect("write");
    snapblk::engine::faults::fail_sync_after(1);
    let first = v.flush().expect_err("the injected EIO");
    assert!(first.to_string().contains("Input/output error"), "{first}");
    // The retry's fdatasync would return 0: it must not be believed.
    let again = v.flush().expect_err("a later flush must fail too");
    assert!(
        again.to_string().contains("an earlier flush failed"),
        "{again}"
    );
    v.write(8192, &block_data(2, 4096), false).expect("write");
    assert!(v.flush().is_err(), "a flush after more writes");
    assert!(v.create_snapshot("s1").is_err(), "a snapshot's flush");
    let why = v.status().flush_failure.expect("status says why");
    assert!(why.contains("Input/output error"), "{why}");
    // Reopened, the volume works again; what was flushed before the failure is there.
    drop(v);
    let v = Volume::open(&dir).expect("reopen");
    assert!(v.status().flush_failure.is_none());
    v.write(0, &block_data(3, 4096), false).expect("write");
    v.flush().expect("flush after reopen");
    let mut buf = vec![0u8; 4096];
    v.read(0, &mut buf).expect("read");
    assert_eq!(buf, block_data(3, 4096));
    v.close().expect("close");
}

/// A zero-length request at the very end of a volume of 2^32 blocks names no block: its
/// start block does not fit 32 bits, and a wrapped 0 must not make it the whole volume.
#[test]
fn empty_requests_at_the_end_of_the_largest_volume_touch_nothing() {
    let tmp = scratch();
    let dir = tmp.path().join("huge");
    let size = (1u64 << 32) * 512;
    let v = Volume::create(
        &dir,
        &CreateOptions {
            size,
            block_size: 512,
        },
    )
    .expect("create a 2 TiB sparse volume");
    v.write(0, &block_data(9, 512), false)
        .expect("write block 0");
    v.discard(size, 0).expect("empty discard at the end");
    v.write_zeroes(size, 0)
        .expect("empty write-zeroes at the end");
    v.write(size, &[], false).expect("empty write at the end");
    v.read(size, &mut []).expect("empty read at the end");
    let mut buf = vec![0u8; 512];
    v.read(0, &mut buf).expect("read block 0");
    assert_eq!(
        buf,
        block_data(9, 512),
        "block 0 was changed by an empty request"
    );
    v.flush().expect("flush");
    v.close().expect("close");
}

/// A volume holds a tenant's data: its folders are 0700 and its files 0600 whatever the
/// umask, and a folder another user could write is refused (a planted manifest or journal
/// would be trusted).
#[test]
fn volume_files_are_private_and_shared_folders_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = scratch();
    let dir = tmp.path().join("v");
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o002) };
    let v = create(&dir, 1 << 20);
    v.write(0, &block_data(1, 4096), false).expect("write");
    v.create_snapshot("s1").expect("snapshot");
    v.flush().expect("flush");
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("layers")), 0o700);
    for e in fs::read_dir(dir.join("layers"))
        .expect("layers")
        .chain(fs::read_dir(&dir).expect("dir"))
    {
        let p = e.expect("entry").path();
        if p.is_file() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    v.close().expect("close");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    match Volume::open(&dir) {
        Ok(_) => panic!("a folder others can write was opened"),
        Err(e) => assert!(e.to_string().contains("chmod 700"), "{e}"),
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    Volume::open(&dir)
        .expect("private again")
        .close()
        .expect("close");
}
