//! Hostile input: names and paths from outside never reach outside their folder, damaged
//! or swapped volume files give errors (never a panic), and inputs the fuzz targets
//! (`fuzz/`) once crashed on stay handled.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use snapblk::csi::ids::{SnapshotId, VolumeId};
use snapblk::engine::{validate_snapshot_name, CreateOptions, Volume};
use snapblk::stream::{export_snapshot, import_streams, NoProgress, StreamInput, StreamReader};

use common::scratch_with_shm_journals;

/// Names that must never become a path or a snapshot.
fn hostile_names() -> Vec<String> {
    vec![
        String::new(),
        ".".into(),
        "..".into(),
        "../x".into(),
        "x/../..".into(),
        "/abs".into(),
        "a/b".into(),
        "a\0b".into(),
        "\0".into(),
        "a\\b".into(),
        "a b".into(),
        "-rf".into(),
        ".hidden".into(),
        "x".repeat(129),
        "x".repeat(5000),
        "caf\u{e9}".into(),
        "a\nb".into(),
    ]
}

/// A small volume with two snapshots and data in each layer, closed.
fn small_volume(dir: &Path) {
    let v = Volume::create(
        dir,
        &CreateOptions {
            size: 256 << 10,
            block_size: 4096,
        },
    )
    .expect("create");
    let block = vec![0x5Au8; 8192];
    v.write(0, &block, false).expect("write");
    v.create_snapshot("a").expect("snapshot a");
    v.write(16384, &block, false).expect("write");
    v.write_zeroes(0, 4096).expect("zeroes");
    v.create_snapshot("b").expect("snapshot b");
    v.write(65536, &block[..4096], false).expect("write");
    v.close().expect("close");
}

/// Every file under `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("list").flatten() {
            if e.file_type().expect("type").is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("list").flatten() {
        let t = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            fs::copy(e.path(), &t).expect("copy");
        }
    }
}

/// Opens the volume in `dir` and reads all of it and its snapshots: any outcome but a
/// panic is acceptable. Returns the error message when it did not open.
fn open_and_read(dir: &Path) -> Option<String> {
    match Volume::open(dir) {
        Ok(v) => {
            let mut buf = vec![0u8; v.size().min(1 << 20) as usize];
            let _ = v.read(0, &mut buf);
            for s in v.list_snapshots() {
                let _ = v.read_snapshot(&s.name, 0, &mut buf[..4096]);
            }
            let _ = v.close();
            None
        }
        Err(e) => Some(e.to_string()),
    }
}

/// Rewrites the manifest of the volume in `dir` through `edit` on its JSON line, with a
/// checksum that matches (a manifest is checksummed, not signed).
fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&str) -> String) {
    let path = dir.join("volume.json");
    let text = fs::read_to_string(&path).expect("read manifest");
    let body = edit(text.lines().next().expect("first line"));
    let crc = crc32c::crc32c(body.as_bytes());
    fs::write(&path, format!("{body}\ncrc32c {crc:08x}\n")).expect("write manifest");
}

#[test]
fn snapshot_names_from_outside_are_refused_with_clear_errors() {
    let (scratch, _) = scratch_with_shm_journals();
    let dir = scratch.path().join("v");
    small_volume(&dir);
    let v = Volume::open(&dir).expect("open");
    for name in hostile_names() {
        let e = validate_snapshot_name(&name).expect_err(&format!("{name:?} accepted"));
        assert!(e.to_string().contains("snapshot name"), "{e}");
        let e = v
            .create_snapshot(&name)
            .expect_err(&format!("{name:?} taken"));
        assert!(e.to_string().contains("snapshot name"), "{e}");
        assert!(v.snapshot_info(&name).is_err(), "{name:?}");
        assert!(v.delete_snapshot(&name).is_err(), "{name:?}");
    }
    assert_eq!(v.list_snapshots().len(), 2);
    v.close().expect("close");
}

/// Replaces the snapshot name in the header of `stream` by `name` (any bytes), fixing the
/// header's length and checksum, so only the name can be refused.
fn with_snapshot_name(stream: &[u8], name: &[u8]) -> Vec<u8> {
    let hlen = u32::from_le_bytes(stream[12..16].try_into().expect("4 bytes")) as usize;
    // Strings start after the 88 fixed bytes (prefix included): volume id, then name.
    let mut at = 88;
    let id_len = u16::from_le_bytes([stream[at], stream[at + 1]]) as usize;
    at += 2 + id_len;
    let old_len = u16::from_le_bytes([stream[at], stream[at + 1]]) as usize;
    let mut out = stream[..at].to_vec();
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&stream[at + 2 + old_len..hlen - 4]);
    let new_len = (out.len() + 4) as u32;
    out[12..16].copy_from_slice(&new_len.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&stream[hlen..]);
    out
}

#[test]
fn names_inside_a_stream_are_refused_and_nothing_is_written() {
    let (scratch, _) = scratch_with_shm_journals();
    let src = scratch.path().join("src");
    small_volume(&src);
    let v = Volume::open(&src).expect("open");
    let (stream, _) =
        export_snapshot(&v, "a", None, Vec::new(), "mem", &NoProgress).expect("export");
    v.close().expect("close");
    // Putting the same name back gives the same stream.
    let same = with_snapshot_name(&stream, b"a");
    assert_eq!(same, stream);
    let out = scratch.path().join("out");
    fs::create_dir(&out).expect("mkdir");
    let mut names: Vec<Vec<u8>> = hostile_names()
        .into_iter()
        .map(String::into_bytes)
        .collect();
    names.push(vec![0xff, 0xfe, b'a']);
    names.push(b"a/\xff".to_vec());
    for name in names {
        let bytes = with_snapshot_name(&stream, &name);
        let e = StreamReader::open(&bytes[..], "s")
            .err()
            .unwrap_or_else(|| panic!("{:?} read", String::from_utf8_lossy(&name)));
        let msg = e.to_string();
        let shown = String::from_utf8_lossy(&name[..name.len().min(40)]).into_owned();
        assert!(
            msg.contains("corrupt")
                && (msg.contains("snapshot name") || msg.contains("header length")),
            "{shown:?}: {msg}"
        );
        let target = out.join("copy");
        let r = import_streams(
            &target,
            vec![StreamInput::new("s", &bytes[..])],
            &NoProgress,
        );
        assert!(r.is_err(), "{shown:?} imported");
        assert!(
            fs::read_dir(&out).expect("ls").count() == 0,
            "{shown:?} left something"
        );
    }
}

#[test]
fn csi_ids_that_could_name_another_folder_are_refused() {
    for name in hostile_names() {
        for id in [
            format!("node/{name}"),
            format!("{name}/key"),
            format!("node/{name}/1"),
        ] {
            assert!(VolumeId::parse(&id).is_err(), "volume id {id:?} accepted");
            assert!(
                SnapshotId::parse(&format!("{id}/1")).is_err(),
                "snapshot id {id:?}/1 accepted"
            );
        }
    }
    for id in [
        "node/key/01",
        "node/key/-1",
        "node/key/1/2",
        "node//1",
        "/key/1",
    ] {
        assert!(SnapshotId::parse(id).is_err(), "{id:?}");
    }
    assert!(VolumeId::parse("node/key").is_ok());
    assert!(SnapshotId::parse("node/key/7").is_ok());
}

#[test]
fn a_manifest_smaller_than_its_data_is_refused_and_nothing_is_cut() {
    // A manifest with a smaller size than its layers' maps (one restored from before a
    // grow, say): opening it must name the problem and change no file, since cutting a
    // data file back to that size would lose what lies past it.
    let (scratch, _) = scratch_with_shm_journals();
    let dir = scratch.path().join("v");
    small_volume(&dir);
    let snapshot_files = |d: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        files_under(d)
            .into_iter()
            .filter(|p| !p.ends_with("lock"))
            .map(|p| {
                let b = fs::read(&p).expect("read");
                (p, b)
            })
            .collect()
    };
    let original = fs::read(dir.join("volume.json")).expect("manifest");
    // 32 KiB: the head's block 16 is past the end; 16 KiB: snapshot b's blocks 4 and 5 too.
    for size in [32u64 << 10, 16 << 10] {
        fs::write(dir.join("volume.json"), &original).expect("restore");
        rewrite_manifest(&dir, |m| {
            let edited = m.replace("\"size\":262144", &format!("\"size\":{size}"));
            assert_ne!(edited, m, "no size field in {m}");
            edited
        });
        let before = snapshot_files(&dir);
        let e = Volume::open(&dir)
            .err()
            .unwrap_or_else(|| panic!("a {size}-byte manifest over 256 KiB of maps opened"));
        assert!(
            e.to_string().contains("past the end of the volume"),
            "{size}: {e}"
        );
        assert!(
            before == snapshot_files(&dir),
            "{size}: opening changed a file"
        );
    }
    fs::write(dir.join("volume.json"), &original).expect("restore");
    let v = Volume::open(&dir).expect("the right manifest opens");
    let mut buf = vec![0u8; 4096];
    v.read(65536, &mut buf).expect("read");
    assert!(
        buf.iter().all(|&b| b == 0x5A),
        "the data past 32 KiB was lost"
    );
    v.close().expect("close");
}

#[test]
fn a_manifest_whose_volume_id_names_another_folder_is_refused() {
    // The volume id becomes part of the volatile journals' names in shared memory: a
    // manifest (checksummed, not signed) must not make the engine create or remove a
    // file outside that folder. Before the fix, this volume opened and its journal was
    // made outside the journals' folder.
    let (scratch, journals) = scratch_with_shm_journals();
    let outside = journals.parent().expect("parent").to_path_buf();
    let tag = format!("escaped-{}", std::process::id());
    fs::create_dir_all(journals.join("snapblk-x")).expect("mkdir");
    let mut ids = vec![format!("x/../../{tag}")];
    ids.extend(["..", "a/b", "", "a\u{0}b", "/abs"].map(String::from));
    ids.push("f".repeat(65));
    for (i, id) in ids.iter().enumerate() {
        let dir = scratch.path().join(format!("v{i}"));
        small_volume(&dir);
        let old = Volume::open(&dir).expect("open").id();
        rewrite_manifest(&dir, |m| {
            let json = serde_json::to_string(id).expect("json");
            m.replace(&format!("\"{old}\""), &json)
        });
        let res = Volume::open(&dir);
        let escaped: Vec<_> = fs::read_dir(&outside)
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&tag))
            .map(|e| e.path())
            .collect();
        for p in &escaped {
            let _ = fs::remove_file(p);
        }
        assert!(escaped.is_empty(), "volume id {id:?} made {escaped:?}");
        let e = res
            .err()
            .unwrap_or_else(|| panic!("volume id {id:?} opened"));
        assert!(
            e.to_string().contains("volume.json") && e.to_string().contains("volume id"),
            "{e}"
        );
    }
}

#[test]
fn damaged_or_swapped_volume_files_give_errors_not_panics() {
    let (scratch, _) = scratch_with_shm_journals();
    let template = scratch.path().join("template");
    small_volume(&template);
    let other = scratch.path().join("other");
    small_volume(&other);
    let files: Vec<PathBuf> = files_under(&template)
        .into_iter()
        .map(|p| p.strip_prefix(&template).expect("inside").to_path_buf())
        .filter(|p| !p.ends_with("lock"))
        .collect();
    assert!(files.len() >= 7, "{files:?}");
    let work = scratch.path().join("work");
    let mut cases = 0;
    let mut run = |what: &str, damage: &dyn Fn(&Path)| {
        let _ = fs::remove_dir_all(&work);
        copy_dir(&template, &work);
        damage(&work);
        // An error or a volume; a panic fails the test.
        let r = std::panic::catch_unwind(|| open_and_read(&work));
        assert!(r.is_ok(), "{what}: panicked");
        cases += 1;
        r.ok().flatten()
    };
    for f in &files {
        let len = fs::metadata(template.join(f)).expect("stat").len();
        let mut cuts = vec![0, 1, len / 3, len / 2, len.saturating_sub(1)];
        cuts.dedup();
        for cut in cuts {
            run(&format!("{} cut at {cut}", f.display()), &|d: &Path| {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(d.join(f))
                    .expect("open");
                file.set_len(cut).expect("truncate");
            });
        }
        for at in [0, 7, 8, 16, 24, 31, 32, 40, len / 2, len.saturating_sub(1)] {
            if at >= len {
                continue;
            }
            run(
                &format!("{} byte {at} flipped", f.display()),
                &|d: &Path| {
                    let p = d.join(f);
                    let mut b = fs::read(&p).expect("read");
                    b[at as usize] ^= 0x41;
                    fs::write(&p, b).expect("write");
                },
            );
        }
    }
    // Swaps: two layers' map logs, two layers' data files, a map log with a data file.
    let maps: Vec<_> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "map"))
        .collect();
    let datas: Vec<_> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "data"))
        .collect();
    assert!(maps.len() >= 3 && datas.len() >= 3, "{files:?}");
    for (a, b) in [
        (maps[0], maps[1]),
        (maps[1], maps[2]),
        (datas[0], datas[2]),
        (maps[0], datas[0]),
    ] {
        let err = run(
            &format!("{} swapped with {}", a.display(), b.display()),
            &|d: &Path| {
                let tmp = d.join("swap");
                fs::rename(d.join(a), &tmp).expect("swap");
                fs::rename(d.join(b), d.join(a)).expect("swap");
                fs::rename(&tmp, d.join(b)).expect("swap");
            },
        );
        if a.extension() == b.extension() && a.extension().is_some_and(|e| e == "map") {
            let e = err.unwrap_or_else(|| panic!("{a:?} and {b:?} swapped: opened"));
            assert!(e.contains("belongs to layer"), "{e}");
        }
    }
    // Files of another volume: its manifest, and one of its map logs.
    for f in ["volume.json".into(), maps[0].clone()] {
        run(
            &format!("{} of another volume", f.display()),
            &|d: &Path| {
                fs::copy(other.join(&f), d.join(&f)).expect("copy");
            },
        );
    }
    assert!(cases > 50, "{cases} cases");
}

#[test]
fn fuzz_seeds_are_valid_inputs() {
    // The seeds the fuzz targets start from (fuzz/seeds/) are valid, so mutations of them
    // reach past the first checks. Regenerated with SNAPBLK_WRITE_FUZZ_SEEDS=1.
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    if std::env::var_os("SNAPBLK_WRITE_FUZZ_SEEDS").is_some() {
        write_seeds(&seeds);
    }
    let stream = fs::read(seeds.join("stream_reader/full")).expect("stream seed");
    // The targets' first byte chooses a mode; the rest is the input.
    let mut r = StreamReader::open(&stream[1..], "seed").expect("stream seed opens");
    while r.next_record().expect("stream seed reads").is_some() {}
    let (scratch, _) = scratch_with_shm_journals();
    let manifest = fs::read(seeds.join("manifest_decode/volume.json")).expect("manifest seed");
    let map = fs::read(seeds.join("maplog_decode/layer.map")).expect("map seed");
    let dir = scratch.path().join("v");
    small_volume(&dir);
    fs::write(dir.join("volume.json"), &manifest).expect("write");
    assert!(
        snapblk::engine::summary(&dir).is_ok(),
        "manifest seed decodes"
    );
    assert!(map.starts_with(b"SNAPBLKM"));
    for t in ["ctl_protocol", "vlog_journal", "volume_open"] {
        assert!(
            fs::read_dir(seeds.join(t)).expect("seeds").count() > 0,
            "{t} has seeds"
        );
    }
}

fn write_seeds(seeds: &Path) {
    let (scratch, _) = scratch_with_shm_journals();
    let dir = scratch.path().join("seed");
    small_volume(&dir);
    let v = Volume::open(&dir).expect("open");
    let (stream, _) =
        export_snapshot(&v, "b", None, Vec::new(), "mem", &NoProgress).expect("export");
    v.close().expect("close");
    let put = |t: &str, name: &str, bytes: &[u8]| {
        fs::create_dir_all(seeds.join(t)).expect("mkdir");
        fs::write(seeds.join(t).join(name), bytes).expect("write seed");
    };
    // Mode 3: repair checksums and import.
    put("stream_reader", "full", &[&[3u8][..], &stream].concat());
    put(
        "manifest_decode",
        "volume.json",
        &fs::read(dir.join("volume.json")).expect("manifest"),
    );
    let layers = dir.join("layers");
    let mut maps: Vec<_> = fs::read_dir(&layers)
        .expect("ls")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "map"))
        .collect();
    maps.sort();
    put(
        "maplog_decode",
        "layer.map",
        &fs::read(&maps[0]).expect("map"),
    );
    put(
        "ctl_protocol",
        "snapshot_create",
        br#"{"v":1,"id":7,"cmd":"snapshot.create","args":{"name":"a","freeze":"auto"}}"#,
    );
    put(
        "ctl_protocol",
        "reply",
        br#"{"v":1,"id":7,"ok":true,"result":{"snapshots":[]}}"#,
    );
    // A journal header: magic, version 2, layer 1, capacity 677, two entries.
    let mut j = vec![0u8; 128];
    j[..8].copy_from_slice(b"SNAPBLKV");
    j[8..12].copy_from_slice(&2u32.to_le_bytes());
    j[16..24].copy_from_slice(&1u64.to_le_bytes());
    j[56..64].copy_from_slice(&3u64.to_le_bytes());
    j[80..88].copy_from_slice(&677u64.to_le_bytes());
    for seq in 1u64..3 {
        let mut e = [0u8; 24];
        e[..8].copy_from_slice(&seq.to_le_bytes());
        e[8] = seq as u8;
        e[12..16].copy_from_slice(&(seq as u32 * 10).to_le_bytes());
        e[16..20].copy_from_slice(&(seq as u32 * 10 + 5).to_le_bytes());
        j.resize(128 + seq as usize * 24, 0);
        j.extend_from_slice(&e);
    }
    put("vlog_journal", "journal", &j);
    // Damage descriptors: file index, operation, offset (4 bytes), bytes.
    put("volume_open", "truncate", &[1, 0, 40, 0, 0, 0]);
    put("volume_open", "overwrite", &[2, 1, 33, 0, 0, 0, 0xff, 0xff]);
    put("volume_open", "swap", &[3, 3, 0, 0, 0, 0, 4]);
}
