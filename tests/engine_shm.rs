//! The volatile journals in shared memory: another local user must not be able to make the
//! daemon trust, follow, or crash on a journal, and the journals keep to their budget, so
//! a small or full /dev/shm gives clear errors, never SIGBUS.
//!
//! Each test writes some blocks and flushes them (version A), writes other blocks without a
//! flush (version B: only the volatile journal names them), lets the daemon die, tampers
//! with the head's journal, and recovers. A tampered journal must be discarded (the B
//! blocks read as zeros, as unflushed writes may after a loss; the A blocks stay) or
//! refused with a clear error; never followed, applied, or allowed to crash the process.
//!
//! The journal layout used to forge fields is the one docs/engine.md describes.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use snapblk::engine::{CreateOptions, Volume};

use common::{block_data, journals_in, open_after_close, scratch_with_shm_journals, versions};

const BS: usize = 4096;
const BLOCKS: usize = 16;
/// Offsets in the journal's header (docs/engine.md).
const COVERED_AT: u64 = 40;
const NEXT_AT: u64 = 56;
const CAPACITY_AT: u64 = 80;

/// The journals' folder and the budget are per process: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn create(dir: &Path) -> Volume {
    Volume::create(
        dir,
        &CreateOptions {
            size: (BLOCKS * BS) as u64,
            block_size: BS as u32,
        },
    )
    .expect("create")
}

fn write(v: &Volume, first: usize, n: usize, version: u64) {
    let mut data = Vec::new();
    for i in 0..n {
        data.extend(block_data(version + i as u64, BS));
    }
    v.write((first * BS) as u64, &data, false).expect("write");
}

fn read_all(v: &Volume) -> Vec<Option<u64>> {
    let mut buf = vec![0u8; BLOCKS * BS];
    v.read(0, &mut buf).expect("read");
    versions(&buf, BS)
}

/// A volume whose blocks 0..4 hold version 100.. flushed and blocks 4..8 version 200..
/// unflushed (only the journal names them: discarded, they read as zeros), the daemon
/// dead; returns its folder and its head's journal.
fn dead_volume(root: &Path, journals: &Path, name: &str) -> (PathBuf, PathBuf) {
    let dir = root.join(name);
    let v = create(&dir);
    write(&v, 0, 4, 100);
    v.flush().expect("flush");
    write(&v, 4, 4, 200);
    let journal = journals.join(format!("snapblk-{}-1.vlog", v.id()));
    assert!(journal.is_file(), "no journal at {}", journal.display());
    drop(v);
    (dir, journal)
}

/// Reopens in a thread (a huge count must not make it loop for ever); the content read.
fn recover(dir: &Path) -> Result<Vec<Option<u64>>, String> {
    let d = dir.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = open_after_close(&d)
            .map(|v| read_all(&v))
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(20))
        .map_err(|_| "recovery did not finish within 20 s".to_string())?
}

fn flushed() -> Vec<Option<u64>> {
    (0..BLOCKS as u64)
        .map(|b| Some(if b < 4 { 100 + b } else { 0 }))
        .collect()
}

fn unflushed() -> Vec<Option<u64>> {
    (0..BLOCKS as u64)
        .map(|b| {
            Some(match b {
                0..4 => 100 + b,
                4..8 => 200 + b - 4,
                _ => 0,
            })
        })
        .collect()
}

fn set_u64(path: &Path, at: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open journal");
    f.write_all_at(&v.to_le_bytes(), at).expect("forge");
}

#[test]
fn an_untouched_journal_is_replayed() {
    let _g = serial();
    let (root, journals) = scratch_with_shm_journals();
    let (dir, _) = dead_volume(root.path(), journals, "plain");
    assert_eq!(recover(&dir).expect("recover"), unflushed());
}

#[test]
fn a_planted_symlink_is_not_followed() {
    let _g = serial();
    let (root, journals) = scratch_with_shm_journals();
    let (dir, journal) = dead_volume(root.path(), journals, "symlink");
    // Someone replaces the journal by a link to a file of the daemon's user.
    let victim = root.path().join("precious");
    fs::write(&victim, b"precious data").expect("victim");
    fs::remove_file(&journal).expect("rm");
    std::os::unix::fs::symlink(&victim, &journal).expect("symlink");
    let got = recover(&dir).expect("recovery refuses or discards, never fails here");
    assert_eq!(got, flushed(), "the planted link was trusted");
    assert_eq!(
        fs::read(&victim).expect("read victim"),
        b"precious data",
        "the link was followed and its target changed"
    );
    let md = fs::symlink_metadata(&journal).expect("a new journal");
    assert!(md.file_type().is_file(), "the link is still there");
}

#[test]
fn a_journal_owned_by_another_user_is_not_trusted() {
    let _g = serial();
    if !is_root() {
        eprintln!("skipped: chown to another user needs root");
        return;
    }
    let (root, journals) = scratch_with_shm_journals();
    let (dir, journal) = dead_volume(root.path(), journals, "foreign");
    std::os::unix::fs::chown(&journal, Some(65534), Some(65534)).expect("chown");
    let got = recover(&dir).expect("recover");
    assert_eq!(got, flushed(), "another user's journal was applied");
    assert_eq!(
        fs::metadata(&journal).expect("stat").uid(),
        0,
        "the foreign journal is still in use"
    );
}

#[test]
fn a_journal_others_may_write_is_not_trusted() {
    let _g = serial();
    let (root, journals) = scratch_with_shm_journals();
    let (dir, journal) = dead_volume(root.path(), journals, "groupw");
    fs::set_permissions(&journal, fs::Permissions::from_mode(0o660)).expect("chmod");
    let got = recover(&dir).expect("recover");
    assert_eq!(got, flushed(), "a group-writable journal was applied");
    let mode = fs::metadata(&journal).expect("stat").mode() & 0o777;
    assert_eq!(mode, 0o600, "the new journal is private");
}

#[test]
fn a_truncated_journal_is_discarded_without_sigbus() {
    let _g = serial();
    let (root, journals) = scratch_with_shm_journals();
    for len in [0u64, 100, 4096, 64 << 10] {
        let (dir, journal) = dead_volume(root.path(), journals, &format!("trunc{len}"));
        fs::OpenOptions::new()
            .write(true)
            .open(&journal)
            .and_then(|f| f.set_len(len))
            .expect("truncate");
        let got = recover(&dir).expect("recover");
        assert_eq!(got, flushed(), "truncated to {len} bytes");
    }
}

#[test]
fn huge_counts_in_a_journal_are_bounded() {
    let _g = serial();
    let (root, journals) = scratch_with_shm_journals();
    let forged: [(&str, u64, u64); 4] = [
        ("next", NEXT_AT, u64::MAX - 1),
        ("covered", COVERED_AT, u64::MAX - 1),
        ("capacity", CAPACITY_AT, u64::MAX / 2),
        ("small-capacity", CAPACITY_AT, 3),
    ];
    for (what, at, value) in forged {
        let (dir, journal) = dead_volume(root.path(), journals, what);
        set_u64(&journal, at, value);
        let got = recover(&dir).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got, flushed(), "forged {what} {value}");
    }
    // An entry naming blocks past the end of the volume.
    let (dir, journal) = dead_volume(root.path(), journals, "past-end");
    // The unflushed write is entry 2 (entry 1 was flushed), in slot 2: after the 128-byte
    // header, 24-byte entries, the first block at +12 and the last at +16.
    set_u64(&journal, 128 + 2 * 24 + 12, (u64::from(u32::MAX) << 32) | 4);
    let got = recover(&dir).expect("recover");
    assert_eq!(got, flushed(), "an entry past the end of the volume");
}

#[test]
fn journals_keep_to_their_budget_and_lose_nothing() {
    let _g = serial();
    let (root, journals) = scratch_with_shm_journals();
    std::env::set_var("SNAPBLK_VLOG_BUDGET", "64K");
    let dir = root.path().join("budget");
    let v = create(&dir);
    let journal = journals.join(format!("snapblk-{}-1.vlog", v.id()));
    // Far more changes than 64 KiB of 24-byte entries hold, never flushed by the caller.
    let n = 20_000u64;
    for i in 0..n {
        write(&v, (i % BLOCKS as u64) as usize, 1, 1000 + i);
    }
    let md = fs::metadata(&journal).expect("stat");
    std::env::remove_var("SNAPBLK_VLOG_BUDGET");
    assert!(md.len() <= 64 << 10, "the journal is {} bytes", md.len());
    assert!(
        md.blocks() * 512 <= (64 << 10) + 4096,
        "the journal holds {} bytes",
        md.blocks() * 512
    );
    drop(v);
    let got = recover(&dir).expect("recover");
    let want: Vec<Option<u64>> = (0..BLOCKS as u64)
        .map(|b| {
            let last = (0..n)
                .rev()
                .find(|i| i % BLOCKS as u64 == b)
                .expect("written");
            Some(1000 + last)
        })
        .collect();
    assert_eq!(got, want, "a write was lost to the budget");
}

/// A tiny tmpfs stands for a container's full /dev/shm.
struct TinyTmpfs {
    dir: tempfile::TempDir,
}

impl TinyTmpfs {
    fn mount(size: &str) -> Option<TinyTmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=1777"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(TinyTmpfs { dir })
    }

    /// Fills it up: the next page anyone asks for is refused.
    fn fill(&self) {
        let mut f = fs::File::create(self.dir.path().join("filler")).expect("filler");
        let chunk = vec![1u8; 4096];
        while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_shared_memory_gives_errors_not_sigbus() {
    let _g = serial();
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let (root, journals) = scratch_with_shm_journals();
    let Some(shm) = TinyTmpfs::mount("256k") else {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    };
    std::env::set_var("SNAPBLK_VLOG_DIR", shm.dir.path());
    std::env::set_var("SNAPBLK_VLOG_BUDGET", "1M");
    let result = std::panic::catch_unwind(|| {
        // A journal made while there is room; then shared memory fills up.
        let dir = root.path().join("full");
        let v = create(&dir);
        shm.fill();
        // The journal cannot grow: the volume flushes and goes on in the part of the
        // journal it has, instead of faulting on a page tmpfs cannot give.
        for i in 0..10_000u64 {
            write(&v, (i % BLOCKS as u64) as usize, 1, 5000 + i);
        }
        drop(v);
        let got = recover(&dir).expect("recover");
        let want: Vec<Option<u64>> = (0..BLOCKS as u64)
            .map(|b| Some(5000 + 10_000 - BLOCKS as u64 + b))
            .collect();
        assert_eq!(got, want);
        // No room for a new head's journal: the cut fails with ENOSPC, the volume goes on.
        let v = open_after_close(&dir).expect("open");
        let e = v.create_snapshot("s").expect_err("no room for a journal");
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        assert!(v.list_snapshots().is_empty());
        write(&v, 0, 1, 99_999);
        v.flush().expect("flush");
        drop(v);
        // And a new volume cannot be made there either: a clear error.
        let e = Volume::create(
            &root.path().join("none"),
            &CreateOptions {
                size: (BLOCKS * BS) as u64,
                block_size: BS as u32,
            },
        )
        .err()
        .expect("no room for a journal");
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    });
    std::env::set_var("SNAPBLK_VLOG_DIR", journals);
    std::env::remove_var("SNAPBLK_VLOG_BUDGET");
    drop(shm);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    // Nothing of this test is left in the shared journals' folder.
    assert!(journals_in(journals).iter().all(|n| !n.contains("full")));
}
