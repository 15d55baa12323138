//! A small valid volume with one of its files damaged (cut, overwritten, replaced, or
//! swapped with another of its files): opening it must give a volume or an error, and
//! reading a volume that opened must give data or an error, never a panic.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use snapblk::engine::{CreateOptions, Volume};

const SIZE: u64 = 256 << 10;

/// The template volume: two snapshots and a head, each with data and zeroed blocks.
fn template() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Volatile journals go in the volume's own folder, with its other files.
        std::env::set_var("SNAPBLK_VLOG_DIR", "");
        // Made anew by each run, in the fuzz build's folder (so no run leaves one behind).
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/volume_open_template");
        let _ = std::fs::remove_dir_all(&dir);
        let v = Volume::create(
            &dir,
            &CreateOptions {
                size: SIZE,
                block_size: 4096,
            },
        )
        .expect("create");
        let block = vec![0xA5u8; 8192];
        v.write(0, &block, false).expect("write");
        v.create_snapshot("a").expect("snapshot a");
        v.write(16384, &block, false).expect("write");
        v.write_zeroes(0, 4096).expect("zero");
        v.create_snapshot("b").expect("snapshot b");
        v.write(65536, &block[..4096], false).expect("write");
        v.flush().expect("flush");
        v.write(131072, &block[..4096], false).expect("write");
        drop(v);
        dir
    })
}

/// Every file of the volume, relative to its folder, in a fixed order.
fn files(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir.join(rel))
        .expect("list")
        .map(|e| e.expect("entry"))
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            files(dir, &r, out);
        } else {
            out.push(r);
        }
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        let t = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).expect("copy");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let template = template();
    let work = snapblk_fuzz::scratch();
    let dir = work.path().join("v");
    copy(template, &dir);
    let mut all = Vec::new();
    files(&dir, Path::new(""), &mut all);
    all.retain(|p| !p.ends_with("lock"));
    let target = dir.join(&all[data[0] as usize % all.len()]);
    let at = u32::from_le_bytes([data[2], data[3], data[4], data[5]]) as u64;
    let rest = &data[6..];
    let len = std::fs::metadata(&target).expect("stat").len();
    match data[1] % 4 {
        0 => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .expect("open");
            f.set_len(at % (len + 1)).expect("truncate");
        }
        1 => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .expect("open");
            f.write_all_at(rest, at % (len + 1)).expect("write");
        }
        2 => std::fs::write(&target, rest).expect("replace"),
        _ => {
            let other = dir.join(&all[rest.first().copied().unwrap_or(0) as usize % all.len()]);
            if other == target {
                return;
            }
            let tmp = dir.join("swap.tmp");
            std::fs::rename(&target, &tmp).expect("swap");
            std::fs::rename(&other, &target).expect("swap");
            std::fs::rename(&tmp, &other).expect("swap");
        }
    }
    if let Ok(v) = Volume::open(&dir) {
        let mut buf = vec![0u8; v.size().min(1 << 20) as usize];
        let _ = v.read(0, &mut buf);
        for s in v.list_snapshots() {
            let _ = v.read_snapshot(&s.name, 0, &mut buf[..4096]);
        }
        let _ = v.close();
    }
});
