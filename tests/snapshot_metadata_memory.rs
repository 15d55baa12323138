//! Memory of a SnapshotMetadata answer for a fully written, fragmented 1 TiB volume: every
//! other 4 KiB block allocated, so 2^27 runs of one block. The maps are built at that
//! scale directly (writing 2^27 blocks through a volume takes too long for a test); the
//! answer is then paged as the node agent pages it. The heap is measured by a counting
//! allocator: the streaming answer's peak above the maps, against collecting the runs
//! into a list first (measured at 1/8 of the scale, where it still fits a test machine,
//! and scaled: it grows linearly with the number of runs).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use roaring::RoaringBitmap;
use snapblk::csi::agent::Pages;
use snapblk::engine::{BlockRuns, Extent};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only counters change.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BS: u32 = 4096;
const MIB: f64 = (1u64 << 20) as f64;

/// A volume of `blocks` blocks with every other block written, as one layer's maps.
fn fragmented(blocks: u64) -> Vec<(RoaringBitmap, RoaringBitmap)> {
    let present =
        RoaringBitmap::from_sorted_iter((0..blocks as u32).step_by(2)).expect("sorted blocks");
    vec![(present, RoaringBitmap::new())]
}

/// Peak heap above the level before `f` runs, and its result.
fn peak_during<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (PEAK.load(Ordering::Relaxed) - base, r)
}

#[test]
fn a_fragmented_tebibyte_streams_in_bounded_memory() {
    let blocks: u64 = (1u64 << 40) / u64::from(BS);
    let t0 = Instant::now();
    let maps = fragmented(blocks);
    let map_bytes: usize = maps.iter().map(|m| m.0.serialized_size()).sum();
    let built = t0.elapsed();

    // The streaming answer: pages of the node's default size, each dropped once sent.
    let runs = BlockRuns::from_maps(maps, true, blocks * u64::from(BS), BS);
    let t1 = Instant::now();
    let (stream_peak, (ranges, pages)) = peak_during(|| {
        let (mut ranges, mut pages) = (0u64, 0u64);
        for p in Pages::new(runs, false, 0) {
            ranges += p.len() as u64;
            pages += 1;
        }
        (ranges, pages)
    });
    let streamed = t1.elapsed();
    assert_eq!(ranges, blocks / 2);

    // The list approach, at 1/8 of the scale.
    let eighth = blocks / 8;
    let runs = BlockRuns::from_maps(fragmented(eighth), true, eighth * u64::from(BS), BS);
    let (list_peak, n) = peak_during(|| {
        let all: Vec<Extent> = runs.collect();
        all.len()
    });
    assert_eq!(n as u64, eighth / 2);

    println!(
        "1 TiB volume, 4 KiB blocks, every other block written: {ranges} ranges in {pages} pages"
    );
    println!(
        "  maps: {:.1} MiB (built in {:.1} s)",
        map_bytes as f64 / MIB,
        built.as_secs_f64()
    );
    println!(
        "  streaming answer: peak heap {:.3} MiB above the maps, {:.1} s",
        stream_peak as f64 / MIB,
        streamed.as_secs_f64()
    );
    println!(
        "  collected list: peak heap {:.1} MiB at 128 GiB, so about {:.0} MiB at 1 TiB",
        list_peak as f64 / MIB,
        list_peak as f64 * 8.0 / MIB
    );
    // A few pages of ranges, whatever the volume's size.
    assert!(stream_peak < 4 << 20, "streaming peak {stream_peak} bytes");
}
