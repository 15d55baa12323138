//! A full or failing disk under the volume's folder: the engine's own fault injection
//! (ENOSPC or EIO on a data write, a map journal append, a sync, a manifest commit) and a
//! small tmpfs filled for real. What must hold: a refused write is never acknowledged,
//! an acknowledged one survives; a failed flush is never followed by one reported done
//! for the same data; a metadata change that fails leaves the volume as it was; once
//! space is back, everything works again.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use snapblk::engine::faults;
use snapblk::engine::{CreateOptions, Volume};

use common::{block_data, open_after_close, scratch};

const BS: usize = 4096;

fn create(dir: &Path, size: u64) -> Volume {
    Volume::create(
        dir,
        &CreateOptions {
            size,
            block_size: BS as u32,
        },
    )
    .expect("create")
}

fn read(v: &Volume, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    v.read(offset, &mut buf).expect("read");
    buf
}

fn layer_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join("layers"))
        .expect("layers folder")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The manifest's content but `next_layer_id` (a failed cut used up an id: ids are
/// never reused).
fn manifest_but_ids(dir: &Path) -> serde_json::Value {
    let text = fs::read_to_string(dir.join("volume.json")).expect("manifest");
    let line = text.lines().next().expect("a first line");
    let mut v: serde_json::Value = serde_json::from_str(line).expect("json");
    v.as_object_mut().expect("object").remove("next_layer_id");
    v
}

#[test]
fn a_refused_write_is_not_acknowledged_and_leaves_no_trace() {
    let tmp = scratch();
    let dir = tmp.path().join("v");
    let v = create(&dir, 1 << 20);
    v.write(0, &block_data(1, 2 * BS), false).expect("write");
    for (errno, at) in [(libc::ENOSPC, 16 * BS as u64), (libc::EIO, 32 * BS as u64)] {
        faults::fail_write_after(1, errno);
        let e = v
            .write(at, &block_data(2, 4 * BS), false)
            .expect_err("the injected fault");
        assert_eq!(e.errno(), errno, "{e}");
        // Half of it reached the file, but no map names it: the range reads as before.
        assert_eq!(read(&v, at, 4 * BS), vec![0u8; 4 * BS]);
    }
    let st = v.status();
    let full = st.disk.full.expect("status says the disk is full");
    assert_eq!(full.refused, 1);
    assert_eq!(st.disk.io_errors, 1);
    assert!(st.flush_failure.is_none(), "{:?}", st.flush_failure);
    v.flush()
        .expect("nothing failed to reach the disk: a flush works");
    drop(v);
    let v = open_after_close(&dir).expect("reopen");
    assert_eq!(read(&v, 0, 2 * BS), block_data(1, 2 * BS));
    assert_eq!(read(&v, 16 * BS as u64, 4 * BS), vec![0u8; 4 * BS]);
    assert_eq!(read(&v, 32 * BS as u64, 4 * BS), vec![0u8; 4 * BS]);
}

/// A journal append that failed for lack of space was cut back: nothing durable changed,
/// so the flush fails without latching, and the next one (space found again) records
/// everything.
#[test]
fn a_journal_append_refused_for_space_fails_that_flush_only() {
    let tmp = scratch();
    let dir = tmp.path().join("v");
    let v = create(&dir, 1 << 20);
    v.write(0, &block_data(1, BS), false).expect("write");
    faults::fail_append_after(1);
    let e = v.flush().expect_err("the injected ENOSPC");
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    let st = v.status();
    assert!(
        st.flush_failure.is_none(),
        "not latched: {:?}",
        st.flush_failure
    );
    assert!(st.disk.full.is_some());
    v.write(BS as u64, &block_data(2, BS), false)
        .expect("write after");
    v.flush().expect("the retry records both writes");
    // Dropped without close: only what the flushes made durable (and the volatile
    // journal, same boot) remains; remove the journal to keep only the flushed state.
    drop(v);
    for name in layer_files(&dir).iter().filter(|n| n.ends_with(".vlog")) {
        fs::remove_file(dir.join("layers").join(name)).expect("remove journal");
    }
    let v = open_after_close(&dir).expect("reopen");
    assert_eq!(read(&v, 0, BS), block_data(1, BS));
    assert_eq!(read(&v, BS as u64, BS), block_data(2, BS));
}

/// After a data sync or a journal sync failed, Linux may report the next sync as done
/// although the pages it could not write were dropped: every later flush fails.
#[test]
fn a_failed_sync_is_never_followed_by_a_flush_reported_done() {
    for nth in [1, 2] {
        let tmp = scratch();
        let dir = tmp.path().join("v");
        let v = create(&dir, 1 << 20);
        v.write(0, &block_data(1, BS), false).expect("write");
        v.flush().expect("flush");
        v.write(BS as u64, &block_data(2, BS), false)
            .expect("write");
        // 1: the data file's fdatasync; 2: the map journal's.
        faults::fail_sync_after(nth);
        let e = v.flush().expect_err("the injected EIO");
        assert_eq!(e.errno(), libc::EIO, "sync {nth}: {e}");
        for _ in 0..3 {
            assert!(
                v.flush().is_err(),
                "sync {nth}: a later flush reported done"
            );
        }
        assert!(v.write(2 * BS as u64, &block_data(3, BS), true).is_err());
        assert!(v.create_snapshot("s").is_err());
        let st = v.status();
        assert!(st.flush_failure.is_some());
        assert!(st.disk.io_errors >= 1);
        assert!(v.list_snapshots().is_empty());
        drop(v);
        // Reopened from what is on disk: what a successful flush covered is there.
        let v = open_after_close(&dir).expect("reopen");
        assert_eq!(read(&v, 0, BS), block_data(1, BS));
        v.flush().expect("a reopened volume flushes");
    }
}

/// A snapshot, delete or grow whose manifest commit fails for lack of space leaves the
/// volume exactly as it was: same snapshots, same size, no files left behind, writes go
/// on; the same change works once space is back.
#[test]
fn metadata_changes_refused_for_space_leave_the_volume_as_it_was() {
    let tmp = scratch();
    let dir = tmp.path().join("v");
    let v = create(&dir, 1 << 20);
    v.write(0, &block_data(1, BS), false).expect("write");
    v.create_snapshot("a").expect("snapshot a");
    v.write(0, &block_data(2, BS), false).expect("write");
    let files = layer_files(&dir);
    let manifest = manifest_but_ids(&dir);

    // The cut's commit and the rewrite of the manifest in force after it both fail:
    // the new head's files must still go (the commit never reached the file).
    faults::fail_next_commits(2);
    let e = v.create_snapshot("b").expect_err("commit refused");
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_eq!(layer_files(&dir), files, "a failed cut left files behind");
    faults::fail_next_commits(1);
    let e = v.create_snapshot("b").expect_err("commit refused");
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    faults::fail_next_commits(1);
    let e = v.delete_snapshot("a").expect_err("commit refused");
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    faults::fail_next_commits(1);
    let e = v.resize(2 << 20).expect_err("commit refused");
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");

    let names: Vec<String> = v.list_snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a"]);
    assert_eq!(v.size(), 1 << 20);
    assert_eq!(layer_files(&dir), files, "a failed cut left files behind");
    assert_eq!(manifest_but_ids(&dir), manifest);
    assert!(!dir.join("volume.tmp").exists());
    assert_eq!(v.status().disk.full.expect("full").refused, 4);
    v.write(BS as u64, &block_data(3, BS), false)
        .expect("writes go on");
    v.flush().expect("flush");

    v.create_snapshot("b").expect("snapshot b with space back");
    v.delete_snapshot("a").expect("delete a");
    v.resize(2 << 20).expect("grow");
    drop(v);
    let v = open_after_close(&dir).expect("reopen");
    let names: Vec<String> = v.list_snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["b"]);
    assert_eq!(read(&v, 0, BS), block_data(2, BS));
    assert_eq!(read(&v, BS as u64, BS), block_data(3, BS));
    let mut buf = vec![0u8; BS];
    v.read_snapshot("b", 0, &mut buf).expect("read b");
    assert_eq!(buf, block_data(2, BS));
}

/// A tmpfs of a few MiB under a volume four times larger, filled for real.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> Option<SmallFs> {
        fs::create_dir_all(at).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallFs(at.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_real_full_file_system_refuses_writes_keeps_acknowledged_ones_and_recovers() {
    let tmp = scratch();
    let mnt = tmp.path().join("small");
    let Some(_fs) = SmallFs::mount(&mnt, "8m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let filler = mnt.join("filler");
    fs::write(&filler, vec![1u8; 2 << 20]).expect("filler");
    let dir = mnt.join("v");
    let v = create(&dir, 32 << 20);
    let chunk = 64 * BS;
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..(32 << 20) / chunk as u64 {
        match v.write(i * chunk as u64, &block_data(i + 1, chunk), false) {
            Ok(()) => acked.push(i),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        if i % 4 == 3 {
            // Flushes fail too once the journal cannot grow; they must not latch.
            let _ = v.flush();
        }
    }
    let e = refused.expect("an 8 MiB file system fills before 32 MiB are written");
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert!(acked.len() >= 8, "only {} chunks fit", acked.len());
    let st = v.status();
    assert!(st.disk.full.is_some(), "status: {:?}", st.disk);
    assert!(st.flush_failure.is_none(), "{:?}", st.flush_failure);
    let before: Vec<String> = v.list_snapshots().into_iter().map(|s| s.name).collect();
    if let Err(e) = v.create_snapshot("full") {
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        let after: Vec<String> = v.list_snapshots().into_iter().map(|s| s.name).collect();
        assert_eq!(after, before);
    }
    for &i in &acked {
        assert_eq!(read(&v, i * chunk as u64, chunk), block_data(i + 1, chunk));
    }

    // Space back: the volume works again, with every acknowledged write.
    fs::remove_file(&filler).expect("remove filler");
    v.flush().expect("flush with space back");
    assert!(v.status().disk.full.is_none(), "{:?}", v.status().disk);
    let next = acked.len() as u64;
    v.write(next * chunk as u64, &block_data(next + 1, BS), false)
        .expect("a write with space back");
    if v.list_snapshots().iter().all(|s| s.name != "full") {
        v.create_snapshot("full").expect("snapshot with space back");
    }
    v.close().expect("close");
    let v = open_after_close(&dir).expect("reopen");
    for &i in &acked {
        assert_eq!(
            read(&v, i * chunk as u64, chunk),
            block_data(i + 1, chunk),
            "chunk {i}"
        );
    }
    assert_eq!(read(&v, next * chunk as u64, BS), block_data(next + 1, BS));
    drop(v);
}
