//! Concurrency: writers on several threads while snapshots are cut, deleted and merged.
//! A per-block version oracle checks that each snapshot holds, for every block, a version
//! that was not yet overwritten when the cut started and had been submitted when it ended,
//! and that deletes and merges never change another snapshot or the live volume.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use snapblk::engine::{CreateOptions, Volume};

use common::{block_data, scratch, version_of};

const BLOCKS: u64 = 256;
const BS: usize = 4096;
const WRITERS: u64 = 4;

/// One write of a block: its version, and the global sequence numbers at which it was
/// submitted and acknowledged.
#[derive(Clone, Copy)]
struct Written {
    version: u64,
    submitted: u64,
    acked: u64,
}

#[test]
fn snapshots_under_concurrent_writes_and_merges_match_the_oracle() {
    let root = scratch();
    let vol = Volume::create(
        &root.path().join("v"),
        &CreateOptions {
            size: BLOCKS * BS as u64,
            block_size: BS as u32,
        },
    )
    .expect("create");
    let seq = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let history: Arc<Mutex<HashMap<u64, Vec<Written>>>> = Arc::default();

    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (vol, seq, stop, history) =
                (vol.clone(), seq.clone(), stop.clone(), history.clone());
            std::thread::spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut version = t << 48;
                while !stop.load(Ordering::Relaxed) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    // Each writer owns the blocks congruent to its index: one writer per block.
                    let block = (rng % (BLOCKS / WRITERS)) * WRITERS + t;
                    version += 1;
                    let submitted = seq.fetch_add(1, Ordering::SeqCst);
                    vol.write(block * BS as u64, &block_data(version, BS), false)
                        .expect("write");
                    let acked = seq.fetch_add(1, Ordering::SeqCst);
                    history.lock().entry(block).or_default().push(Written {
                        version,
                        submitted,
                        acked,
                    });
                }
            })
        })
        .collect();

    // Snapshot thread: cut, record the window, read the snapshot back, delete some old ones.
    let mut snaps: Vec<(String, u64, u64, Vec<u64>)> = vec![];
    for i in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(3));
        let name = format!("s{i}");
        let start = seq.fetch_add(1, Ordering::SeqCst);
        vol.create_snapshot(&name).expect("snapshot");
        let end = seq.fetch_add(1, Ordering::SeqCst);
        let mut buf = vec![0u8; BLOCKS as usize * BS];
        vol.read_snapshot(&name, 0, &mut buf)
            .expect("read snapshot");
        let content: Vec<u64> = buf
            .chunks(BS)
            .map(|c| version_of(c).expect("torn block in a snapshot"))
            .collect();
        snaps.push((name, start, end, content));
        if i % 3 == 2 {
            // Delete an older snapshot (merge while writers run).
            let (gone, ..) = snaps.remove(snaps.len() / 2);
            vol.delete_snapshot(&gone).expect("delete");
        }
        if i % 7 == 6 {
            // Delete the newest snapshot: its layer sits under the live head.
            let (gone, ..) = snaps.pop().expect("a snapshot");
            vol.delete_snapshot(&gone).expect("delete newest");
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().expect("writer");
    }

    let history = history.lock();
    let block_versions = |b: u64| history.get(&b).cloned().unwrap_or_default();
    for (name, start, end, content) in &snaps {
        for b in 0..BLOCKS {
            let got = content[b as usize];
            let writes = block_versions(b);
            let floor = writes
                .iter()
                .filter(|w| w.acked < *start)
                .map(|w| w.version)
                .max()
                .unwrap_or(0);
            let legal = got == floor
                || writes
                    .iter()
                    .any(|w| w.version == got && w.version > floor && w.submitted < *end);
            assert!(
                legal,
                "snapshot {name} block {b}: version {got}, acked before the cut {floor}"
            );
        }
        // Re-read after all the deletes and merges: unchanged.
        let mut buf = vec![0u8; BLOCKS as usize * BS];
        vol.read_snapshot(name, 0, &mut buf)
            .expect("re-read snapshot");
        let again: Vec<u64> = buf
            .chunks(BS)
            .map(|c| version_of(c).expect("torn"))
            .collect();
        assert_eq!(
            &again, content,
            "snapshot {name} changed after deletes and merges"
        );
    }
    let mut buf = vec![0u8; BLOCKS as usize * BS];
    vol.read(0, &mut buf).expect("read live");
    for b in 0..BLOCKS {
        let last = block_versions(b).last().map(|w| w.version).unwrap_or(0);
        assert_eq!(
            version_of(&buf[b as usize * BS..(b as usize + 1) * BS]),
            Some(last),
            "live block {b}"
        );
    }
    // Once a snapshot seals the head, every deleted snapshot's layer can be merged.
    vol.create_snapshot("final").expect("final snapshot");
    vol.maintain().expect("maintain");
    assert_eq!(
        vol.status().pending_merges,
        0,
        "merges left pending after maintain"
    );
    vol.read(0, &mut buf).expect("read live after merges");
    for b in 0..BLOCKS {
        let last = block_versions(b).last().map(|w| w.version).unwrap_or(0);
        assert_eq!(
            version_of(&buf[b as usize * BS..(b as usize + 1) * BS]),
            Some(last),
            "live block {b} after merges"
        );
    }
}
