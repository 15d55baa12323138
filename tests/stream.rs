//! The backup stream end to end: snapshots exported as a full stream and incrementals,
//! imported into a new volume and compared byte for byte; damaged, truncated and
//! out-of-order streams refused with errors that say what is wrong, leaving no folder.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapblk::engine::{CreateOptions, Volume};
use snapblk::stream::{
    export_snapshot, import_streams, ImportSummary, NoProgress, Record, StreamError, StreamInput,
    StreamReader,
};

use common::{block_data, open_after_close, scratch};

const MIB: u64 = 1 << 20;

fn create(dir: &Path, size: u64, block_size: u32) -> Volume {
    Volume::create(dir, &CreateOptions { size, block_size }).expect("create")
}

/// A small deterministic generator, so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes `count` blocks at block `start`, each tagged with its own version.
fn write_blocks(v: &Volume, start: u64, count: u64, version: u64) {
    let bs = u64::from(v.block_size());
    let mut data = Vec::with_capacity((count * bs) as usize);
    for i in 0..count {
        data.extend(block_data(version * 1_000_000 + start + i, bs as usize));
    }
    v.write(start * bs, &data, false).expect("write");
}

/// A round of random writes, discards and zeroings, some longer than one record (1 MiB).
fn churn(v: &Volume, rng: &mut Rng, version: u64, ops: usize) {
    let bs = u64::from(v.block_size());
    let blocks = v.size() / bs;
    for _ in 0..ops {
        let start = rng.below(blocks);
        let max = if rng.below(8) == 0 { 3 * MIB / bs } else { 16 };
        let count = (1 + rng.below(max)).min(blocks - start);
        match rng.below(6) {
            0 => v.discard(start * bs, count * bs).expect("discard"),
            1 => v.write_zeroes(start * bs, count * bs).expect("zeroes"),
            _ => write_blocks(v, start, count, version),
        }
    }
}

fn export(v: &Volume, snapshot: &str, since: Option<&str>) -> Vec<u8> {
    let (out, summary) =
        export_snapshot(v, snapshot, since, Vec::new(), "mem", &NoProgress).expect("export");
    assert_eq!(summary.stream_bytes, out.len() as u64);
    out
}

fn header_len(stream: &[u8]) -> u64 {
    u64::from(u32::from_le_bytes(
        stream[12..16].try_into().expect("4 bytes"),
    ))
}

fn import(target: &Path, streams: &[(&str, &[u8])]) -> Result<ImportSummary, StreamError> {
    let inputs = streams
        .iter()
        .map(|(name, bytes)| StreamInput::new(*name, *bytes))
        .collect();
    import_streams(target, inputs, &NoProgress)
}

/// Asserts that snapshot `snap` reads the same in both volumes, 1 MiB at a time.
fn assert_same_snapshot(src: &Volume, dst: &Volume, snap: &str) {
    assert_eq!(src.size(), dst.size());
    let (a, b) = (
        src.snapshot_view(snap).expect("source view"),
        dst.snapshot_view(snap).expect("imported view"),
    );
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut off = 0;
    while off < src.size() {
        let n = (src.size() - off).min(MIB) as usize;
        a.read(off, &mut x[..n]).expect("read source");
        b.read(off, &mut y[..n]).expect("read import");
        if x[..n] != y[..n] {
            let i = (0..n).find(|&i| x[i] != y[i]).unwrap_or(0);
            panic!("snapshot {snap} differs at byte {}", off + i as u64);
        }
        off += n as u64;
    }
}

/// The entries of a folder, sorted: shows that nothing was left behind.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn full_and_incrementals_rebuild_every_snapshot_byte_for_byte() {
    for (bs, size) in [(4096u32, 24 * MIB), (512, 5 * MIB)] {
        let root = scratch();
        let src = create(&root.path().join("src"), size, bs);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(bs));
        churn(&src, &mut rng, 1, 60);
        src.create_snapshot("s1").expect("s1");
        churn(&src, &mut rng, 2, 60);
        src.create_snapshot("s2").expect("s2");
        churn(&src, &mut rng, 3, 60);
        src.create_snapshot("s3").expect("s3");
        churn(&src, &mut rng, 4, 20); // the live head: not exported

        let full = export(&src, "s1", None);
        let inc2 = export(&src, "s2", Some("s1"));
        let inc3 = export(&src, "s3", Some("s2"));
        let target = root.path().join("copy");
        let summary = import(
            &target,
            &[("full", &full), ("inc2", &inc2), ("inc3", &inc3)],
        )
        .expect("import");
        assert_eq!(summary.snapshots, ["s1", "s2", "s3"]);
        assert_eq!(
            summary.stream_bytes,
            (full.len() + inc2.len() + inc3.len()) as u64
        );

        let dst = open_after_close(&target).expect("open the import");
        assert_ne!(dst.id(), src.id(), "an import is a new volume");
        assert_eq!(dst.block_size(), bs);
        let names: Vec<String> = dst.list_snapshots().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["s1", "s2", "s3"]);
        for s in ["s1", "s2", "s3"] {
            assert_same_snapshot(&src, &dst, s);
        }
        // Incrementals carry only what changed: the maps of the imported volume say the
        // same blocks changed as in the source.
        assert_eq!(
            dst.changed_extents("s1", "s2").expect("changed"),
            src.changed_extents("s1", "s2").expect("changed")
        );
        assert_eq!(
            dst.allocated_extents("s3").expect("allocated"),
            src.allocated_extents("s3").expect("allocated")
        );
        assert_eq!(entries(root.path()), ["copy", "src"]);
    }
}

#[test]
fn an_incremental_after_discards_hides_the_discarded_data() {
    let root = scratch();
    let src = create(&root.path().join("src"), 4 * MIB, 4096);
    write_blocks(&src, 0, 64, 1);
    src.create_snapshot("before").expect("snapshot");
    src.discard(8 * 4096, 8 * 4096).expect("discard");
    src.write_zeroes(32 * 4096, 4 * 4096).expect("zeroes");
    write_blocks(&src, 40, 2, 2);
    src.create_snapshot("after").expect("snapshot");

    let full = export(&src, "before", None);
    let inc = export(&src, "after", Some("before"));
    // The incremental names the discarded ranges as zero extents and sends only the
    // rewritten blocks as data.
    let mut r = StreamReader::open(&inc[..], "inc").expect("open");
    let mut zeros = Vec::new();
    let mut data = Vec::new();
    while let Some(rec) = r.next_record().expect("record") {
        match rec {
            Record::Zero { offset, length } => zeros.push((offset / 4096, length / 4096)),
            Record::Data { offset, data: d } => data.push((offset / 4096, d.len() as u64 / 4096)),
        }
    }
    assert_eq!(zeros, [(8, 8), (32, 4)]);
    assert_eq!(data, [(40, 2)]);

    let target = root.path().join("copy");
    import(&target, &[("full", &full), ("inc", &inc)]).expect("import");
    let dst = open_after_close(&target).expect("open");
    let mut buf = vec![0u8; 4096];
    for block in [8u64, 15, 32, 35] {
        dst.read_snapshot("after", block * 4096, &mut buf)
            .expect("read");
        assert!(
            buf.iter().all(|&b| b == 0),
            "block {block} still shows old data"
        );
        dst.read_snapshot("before", block * 4096, &mut buf)
            .expect("read");
        assert_eq!(
            buf,
            block_data(1_000_000 + block, 4096),
            "block {block} of the base"
        );
    }
    assert_same_snapshot(&src, &dst, "before");
    assert_same_snapshot(&src, &dst, "after");
}

/// A small source and its chain (full s1, incremental s2), for the refusal tests.
struct Chain {
    _root: tempfile::TempDir,
    dir: PathBuf,
    full: Vec<u8>,
    inc: Vec<u8>,
}

fn small_chain() -> Chain {
    let root = scratch();
    let dir = root.path().join("src");
    let v = create(&dir, MIB, 4096);
    write_blocks(&v, 0, 3, 1);
    write_blocks(&v, 10, 1, 1);
    v.create_snapshot("s1").expect("s1");
    write_blocks(&v, 1, 1, 2);
    v.discard(10 * 4096, 4096).expect("discard");
    write_blocks(&v, 20, 2, 2);
    v.create_snapshot("s2").expect("s2");
    let full = export(&v, "s1", None);
    let inc = export(&v, "s2", Some("s1"));
    Chain {
        _root: root,
        dir,
        full,
        inc,
    }
}

/// Where the parts of a stream are: (start, length, what).
fn layout(s: &[u8]) -> Vec<(usize, usize, &'static str)> {
    let hl = header_len(s) as usize;
    let mut parts = vec![(0, hl, "header")];
    let mut pos = hl;
    while pos < s.len() {
        let kind = s[pos + 4];
        let len = u64::from_le_bytes(s[pos + 16..pos + 24].try_into().expect("8 bytes")) as usize;
        match kind {
            1 => {
                parts.push((pos, 32, "record header"));
                parts.push((pos + 32, len, "data"));
                pos += 32 + len;
            }
            2 => {
                parts.push((pos, 32, "record header"));
                pos += 32;
            }
            _ => {
                parts.push((pos, 32 + len, "trailer"));
                pos += 32 + len;
            }
        }
    }
    parts
}

/// Checks that an import failed with an error naming `stream`, and left nothing behind.
fn assert_refused(
    root: &Path,
    target: &Path,
    r: Result<ImportSummary, StreamError>,
    stream: &str,
) -> StreamError {
    let e = match r {
        Ok(_) => panic!("import of a bad {stream} accepted"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("{stream}: ")), "{msg}");
    assert!(!target.exists(), "{msg}: the target was created");
    assert_eq!(entries(root), ["src"], "{msg}: something was left behind");
    e
}

#[test]
fn a_flipped_byte_anywhere_is_refused_and_nothing_is_left() {
    let c = small_chain();
    let root = c._root.path();
    let target = root.join("copy");
    let mut seen = std::collections::BTreeSet::new();
    for which in ["full", "inc"] {
        let good = if which == "full" { &c.full } else { &c.inc };
        for (start, len, what) in layout(good) {
            // Every byte of headers and the trailer; some bytes of each data payload.
            let step = if what == "data" { 97 } else { 1 };
            for pos in (start..start + len).step_by(step) {
                let mut bad = good.clone();
                bad[pos] ^= 0x20;
                let streams: [(&str, &[u8]); 2] = if which == "full" {
                    [("full", &bad), ("inc", &c.inc)]
                } else {
                    [("full", &c.full), ("inc", &bad)]
                };
                let e = assert_refused(root, &target, import(&target, &streams), which);
                let msg = e.to_string();
                let header_len_field = what == "header" && (12..16).contains(&pos);
                match e {
                    StreamError::Corrupt { offset, .. } => {
                        assert!(msg.contains("corrupt at byte"), "{msg}");
                        // The damage is found within the part it hit (a damaged header
                        // length moves where the header's checksum is looked for).
                        assert!(
                            header_len_field || offset as usize <= start + len,
                            "{msg}: flip at {pos}"
                        );
                    }
                    StreamError::Truncated { .. } if header_len_field => {}
                    other => panic!("flip at byte {pos} ({what}) gave {other}"),
                }
                seen.insert(what);
            }
        }
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
}

#[test]
fn specific_damage_gives_specific_messages() {
    let c = small_chain();
    let root = c._root.path();
    let target = root.join("copy");
    let parts = layout(&c.full);
    let err = |bytes: &[u8]| {
        assert_refused(root, &target, import(&target, &[("full", bytes)]), "full").to_string()
    };
    let flip = |pos: usize| {
        let mut b = c.full.clone();
        b[pos] ^= 1;
        b
    };
    let data = parts.iter().find(|p| p.2 == "data").expect("data");
    let rec = parts
        .iter()
        .find(|p| p.2 == "record header")
        .expect("record");
    let trailer = parts.last().expect("trailer");
    let e = err(&flip(0));
    assert!(e.contains("bad magic"), "{e}");
    let e = err(&flip(20));
    assert!(e.contains("header checksum mismatch"), "{e}");
    let e = err(&flip(data.0 + 5));
    assert!(e.contains("data checksum mismatch"), "{e}");
    assert!(e.contains(&format!("byte {}", data.0)), "{e}");
    let e = err(&flip(rec.0 + 9));
    assert!(e.contains("record header checksum"), "{e}");
    let e = err(&flip(trailer.0 + 32 + 3));
    assert!(e.contains("trailer checksum"), "{e}");
    // A newer version, with a valid checksum: refused as unsupported, not as damage.
    let mut newer = c.full.clone();
    newer[8] = 2;
    let hl = header_len(&newer) as usize;
    let crc = crc32c::crc32c(&newer[..hl - 4]);
    newer[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
    let e = err(&newer);
    assert!(e.contains("format version 2 is not supported"), "{e}");
    // Two records swapped: each is sound, the whole-stream checksum is not.
    let recs: Vec<_> = parts.iter().filter(|p| p.2 == "record header").collect();
    assert!(recs.len() >= 2);
    // Swap the order of the first two records' headers and payloads is not possible
    // without breaking the offset order, so drop one whole record instead.
    let (a, b) = (recs[0].0, recs[1].0);
    let mut dropped = c.full[..a].to_vec();
    dropped.extend_from_slice(&c.full[b..]);
    let e = err(&dropped);
    assert!(e.contains("does not match") || e.contains("counts"), "{e}");
    // A trailer whose counts disagree with the records but whose checksums were redone:
    // the counts themselves are checked.
    let mut resealed = c.full.clone();
    let t = trailer.0;
    let dr = u64::from_le_bytes(resealed[t + 32..t + 40].try_into().expect("8"));
    resealed[t + 32..t + 40].copy_from_slice(&(dr + 1).to_le_bytes());
    let pcrc = crc32c::crc32c(&resealed[t + 32..t + 72]);
    resealed[t + 24..t + 28].copy_from_slice(&pcrc.to_le_bytes());
    let hcrc = crc32c::crc32c(&resealed[t..t + 28]);
    resealed[t + 28..t + 32].copy_from_slice(&hcrc.to_le_bytes());
    let e = err(&resealed);
    assert!(e.contains("the trailer counts"), "{e}");
    // Garbage after the trailer.
    let mut longer = c.full.clone();
    longer.extend_from_slice(b"x");
    let e = err(&longer);
    assert!(e.contains("after the stream's trailer"), "{e}");
    // Not a stream at all, and an empty one.
    let e = err(b"hello, this is not a stream at all........");
    assert!(e.contains("not a snapblk stream"), "{e}");
    let e = err(b"");
    assert!(e.contains("truncated at byte 0"), "{e}");
}

#[test]
fn a_truncated_stream_is_refused_at_any_length() {
    let c = small_chain();
    let root = c._root.path();
    let target = root.join("copy");
    for which in ["full", "inc"] {
        let good = if which == "full" { &c.full } else { &c.inc };
        let mut lengths: Vec<usize> = (0..200).collect();
        for (start, len, _) in layout(good) {
            lengths.extend([start.saturating_sub(1), start, start + 1, start + len - 1]);
        }
        lengths.extend((0..good.len()).step_by(211));
        lengths.retain(|&l| l < good.len());
        lengths.sort();
        lengths.dedup();
        for len in lengths {
            let cut = &good[..len];
            let streams: [(&str, &[u8]); 2] = if which == "full" {
                [("full", cut), ("inc", &c.inc)]
            } else {
                [("full", &c.full), ("inc", cut)]
            };
            let e = assert_refused(root, &target, import(&target, &streams), which);
            match e {
                StreamError::Truncated { offset, .. } => assert_eq!(offset, len as u64),
                other => panic!("cut at {len} gave {other}"),
            }
        }
    }
}

#[test]
fn streams_out_of_order_or_of_another_volume_are_refused() {
    let c = small_chain();
    let root = c._root.path();
    let target = root.join("copy");
    let v = Volume::open(&c.dir).expect("open");
    write_blocks(&v, 30, 1, 3);
    v.create_snapshot("s3").expect("s3");
    let inc3 = export(&v, "s3", Some("s2"));
    let full3 = export(&v, "s3", None);

    // (streams in the order given, the stream blamed, what the message says)
    type Case<'a> = (Vec<(&'a str, &'a [u8])>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("inc", &c.inc)],
            "inc",
            "a full stream must come first",
        ),
        (
            vec![("inc", &c.inc), ("full", &c.full)],
            "inc",
            "a full stream must come first",
        ),
        (
            vec![("full", &c.full), ("inc3", &inc3)],
            "inc3",
            "based on snapshot \"s2\"",
        ),
        (
            vec![("full", &c.full), ("inc3", &inc3), ("inc", &c.inc)],
            "inc3",
            "previous stream holds snapshot \"s1\"",
        ),
        (
            vec![("full", &c.full), ("inc", &c.inc), ("inc", &c.inc)],
            "inc",
            "previous stream holds snapshot \"s2\"",
        ),
        (
            vec![("full", &c.full), ("full3", &full3)],
            "full3",
            "only incremental streams may follow",
        ),
    ];
    for (streams, culprit, needle) in cases {
        let e = assert_refused(root, &target, import(&target, &streams), culprit).to_string();
        assert!(e.contains(needle), "{e}");
    }

    // Another volume with the same snapshot names.
    let other_dir = root.join("other");
    let other = create(&other_dir, MIB, 4096);
    write_blocks(&other, 0, 1, 9);
    other.create_snapshot("s1").expect("s1");
    write_blocks(&other, 1, 1, 9);
    other.create_snapshot("s2").expect("s2");
    let other_inc = export(&other, "s2", Some("s1"));
    drop(other);
    fs::remove_dir_all(&other_dir).expect("rm");
    let e = assert_refused(
        root,
        &target,
        import(&target, &[("full", &c.full), ("other", &other_inc)]),
        "other",
    )
    .to_string();
    assert!(e.contains("stream of volume"), "{e}");

    // A base deleted and taken again under the same name is another snapshot.
    v.delete_snapshot("s1").expect("delete");
    v.create_snapshot("s1").expect("s1 again");
    write_blocks(&v, 5, 1, 4);
    v.create_snapshot("s4").expect("s4");
    let inc4 = export(&v, "s4", Some("s1"));
    let e = assert_refused(
        root,
        &target,
        import(&target, &[("full", &c.full), ("inc4", &inc4)]),
        "inc4",
    )
    .to_string();
    assert!(e.contains("based on snapshot \"s1\" (id 4)"), "{e}");

    // Two streams glued into one.
    let glued = [c.full.clone(), c.inc.clone()].concat();
    let e = assert_refused(
        root,
        &target,
        import(&target, &[("glued", &glued)]),
        "glued",
    );
    assert!(matches!(e, StreamError::TrailingData { .. }), "{e}");

    // The good chain still imports, and an existing target is never touched.
    import(&target, &[("full", &c.full), ("inc", &c.inc)]).expect("good chain");
    let e = import(&target, &[("full", &c.full)]).expect_err("target exists");
    assert!(matches!(e, StreamError::TargetExists { .. }), "{e}");
}

#[test]
fn export_reads_a_consistent_snapshot_while_the_volume_is_written() {
    let root = scratch();
    let v = create(&root.path().join("src"), 8 * MIB, 4096);
    write_blocks(&v, 0, 2048, 1);
    v.create_snapshot("s1").expect("s1");
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let stream = std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                write_blocks(&v, n % 2048, 1, 2);
                n += 1;
                written.store(n, Ordering::Relaxed);
            }
        });
        // Let the writer get going, so the export overlaps its writes.
        while written.load(Ordering::Relaxed) < 16 {
            std::thread::yield_now();
        }
        let stream = export(&v, "s1", None);
        stop.store(true, Ordering::Relaxed);
        stream
    });
    let mut head = vec![0u8; 4096];
    v.read(0, &mut head).expect("read head");
    assert_ne!(
        head,
        block_data(1_000_000, 4096),
        "the head was not written"
    );
    let target = root.path().join("copy");
    import(&target, &[("s1", &stream)]).expect("import");
    let dst = open_after_close(&target).expect("open");
    assert_same_snapshot(&v, &dst, "s1");
}

/// The `snapblk` binary built with the tests.
fn snapblk() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_snapblk"));
    c.env("RUST_LOG", "warn");
    c
}

#[test]
fn cli_exports_to_a_file_and_stdout_and_imports_from_stdin() {
    let root = scratch();
    let dir = root.path().join("src");
    let v = create(&dir, 4 * MIB, 4096);
    let mut rng = Rng(42);
    churn(&v, &mut rng, 1, 30);
    v.create_snapshot("s1").expect("s1");
    churn(&v, &mut rng, 2, 30);
    v.create_snapshot("s2").expect("s2");
    v.close().expect("close");

    let file1 = root.path().join("s1.snapblk");
    let out = snapblk()
        .arg("export")
        .arg(&dir)
        .arg("s1")
        .arg("-o")
        .arg(&file1)
        .output()
        .expect("run export");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("exported snapshot s1 of src (full)"), "{err}");
    assert!(out.stdout.is_empty());

    let out = snapblk()
        .args([
            "export",
            &dir.to_string_lossy(),
            "s2",
            "--since",
            "s1",
            "-o",
            "-",
        ])
        .output()
        .expect("run export to stdout");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inc = out.stdout;
    assert!(inc.starts_with(b"SNAPBLKS"));

    let import_stdin = |target: &Path, stdin_bytes: &[u8]| {
        let mut child = snapblk()
            .arg("import")
            .arg(target)
            .arg(&file1)
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run import");
        let mut stdin = child.stdin.take().expect("stdin");
        // The importer may refuse before reading everything: a broken pipe is fine then.
        let _ = stdin.write_all(stdin_bytes);
        drop(stdin);
        child.wait_with_output().expect("import output")
    };
    let target = root.path().join("copy");
    let out = import_stdin(&target, &inc);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("imported 2 streams (snapshots s1, s2)"),
        "{text}"
    );

    let src = Volume::open(&dir).expect("open source");
    let dst = open_after_close(&target).expect("open import");
    assert_same_snapshot(&src, &dst, "s1");
    assert_same_snapshot(&src, &dst, "s2");
    drop((src, dst));

    // A damaged stream on stdin: exit status 1, a clear message, no folder.
    let mut bad = inc.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let target2 = root.path().join("copy2");
    let out = import_stdin(&target2, &bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stdin: corrupt at byte"), "{err}");
    assert!(!target2.exists());

    // A failed export (no such snapshot) leaves no file, and keeps an older one intact.
    let out = snapblk()
        .arg("export")
        .arg(&dir)
        .arg("nope")
        .arg("-o")
        .arg(&file1)
        .output()
        .expect("run export");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot named \"nope\""));
    let kept = fs::read(&file1).expect("older stream kept");
    assert!(kept.starts_with(b"SNAPBLKS"));
    assert_eq!(
        entries(root.path()),
        ["copy", "s1.snapblk", "src"],
        "nothing left behind"
    );
}

#[test]
fn a_chain_across_a_grow_imports_each_snapshot_at_its_size() {
    let root = scratch();
    let src = create(&root.path().join("src"), 2 * MIB, 4096);
    write_blocks(&src, 0, 4, 1);
    src.create_snapshot("small").expect("small");
    src.resize(3 * MIB).expect("grow");
    write_blocks(&src, 3 * MIB / 4096 - 2, 2, 2);
    src.create_snapshot("big").expect("big");

    let full = export(&src, "small", None);
    let inc = export(&src, "big", Some("small"));
    let target = root.path().join("copy");
    import(&target, &[("full", &full), ("inc", &inc)]).expect("import");
    let dst = open_after_close(&target).expect("open");
    assert_eq!(dst.size(), 3 * MIB);
    for (snap, size) in [("small", 2 * MIB), ("big", 3 * MIB)] {
        assert_eq!(dst.snapshot_info(snap).expect("info").size, size);
        let (mut x, mut y) = (vec![0u8; size as usize], vec![0u8; size as usize]);
        src.read_snapshot(snap, 0, &mut x).expect("read source");
        dst.read_snapshot(snap, 0, &mut y).expect("read copy");
        assert!(x == y, "snapshot {snap} differs");
    }
}
