//! Open files of a volume with many snapshots: one data file per layer, plus the head's
//! journals. A sealed head closes its map journal, so a thousand snapshots do not need two
//! thousand descriptors. Alone in its own test binary: it counts the process's descriptors.

mod common;

use std::path::Path;

use snapblk::engine::{CreateOptions, Volume};

use common::{block_data, scratch};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .count()
}

fn layer_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("layers"))
        .expect("list the volume's layers")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".data"))
        .count()
}

#[test]
fn a_snapshot_adds_one_open_file() {
    let root = scratch();
    let dir = root.path().join("vol");
    let v = Volume::create(
        &dir,
        &CreateOptions {
            size: 8 << 20,
            block_size: 4096,
        },
    )
    .expect("create");
    v.set_head_reserve(Some(0));
    v.write(0, &block_data(1, 4096), false).expect("write");
    v.create_snapshot("s0").expect("first snapshot");
    let before = open_fds();
    const SNAPSHOTS: usize = 40;
    for i in 1..=SNAPSHOTS {
        let block = (i as u64 % 512) * 4096;
        v.write(block, &block_data(i as u64 + 1, 4096), false)
            .expect("write");
        v.create_snapshot(&format!("s{i}")).expect("snapshot");
    }
    v.flush().expect("flush");
    let grown = open_fds() - before;
    assert!(
        layer_files(&dir) > SNAPSHOTS,
        "the snapshots were merged away: the test measures nothing"
    );
    assert!(
        grown <= SNAPSHOTS + 2,
        "{SNAPSHOTS} snapshots opened {grown} more files (one per layer expected)"
    );
    v.close().expect("close");
}
