//! A sealed layer keeps its slot table in a compact, read-only form: a volume holds every
//! snapshot's table in memory, and scattered writes in the table a head fills as it goes
//! cost about three times as much.

mod common;

use std::time::{Duration, Instant};

use snapblk::engine::{CreateOptions, Volume};

use common::{block_data, scratch};

const BS: u64 = 4096;
/// Blocks of the volume: 512 MiB, sparse.
const BLOCKS: u64 = 131_072;

/// Scattered blocks: a few in each 1024-block part of the table.
fn scattered(i: u64) -> u64 {
    (i * 2_654_435_761) % BLOCKS
}

#[test]
fn a_sealed_head_is_compacted_and_reads_the_same() {
    let root = scratch();
    let dir = root.path().join("vol");
    let v = Volume::create(
        &dir,
        &CreateOptions {
            size: BLOCKS * BS,
            block_size: BS as u32,
        },
    )
    .expect("create");
    v.set_head_reserve(Some(0));
    // A first snapshot, so that the writes below go to a slotted head made by a cut.
    v.create_snapshot("s0").expect("first snapshot");
    for i in 0..256 {
        v.write(scattered(i) * BS, &block_data(i + 1, BS as usize), false)
            .expect("write");
    }
    v.flush().expect("flush");
    let before = v.status().map_bytes;
    v.create_snapshot("s1").expect("snapshot");
    // The preparer compacts the sealed head in the background.
    let t = Instant::now();
    let mut after = v.status().map_bytes;
    while after * 2 >= before && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
        after = v.status().map_bytes;
    }
    assert!(
        after * 2 < before,
        "the maps and slot tables took {before} bytes before the snapshot, {after} after it"
    );
    let check = |v: &Volume| {
        let mut buf = vec![0u8; BS as usize];
        for i in 0..256 {
            v.read(scattered(i) * BS, &mut buf).expect("read");
            assert!(
                buf == block_data(i + 1, BS as usize),
                "block {}",
                scattered(i)
            );
        }
    };
    check(&v);
    v.close().expect("close");
    // Opened again, its sealed layers start compact.
    let v = Volume::open(&dir).expect("open");
    check(&v);
    assert!(v.status().map_bytes * 2 < before);
    v.close().expect("close");
}
