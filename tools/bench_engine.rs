//! Engine benchmark: 4 KiB random I/O through the engine against plain pread/pwrite on
//! the same kind of file (O_DIRECT where the file system allows it), with 0, 1 and 100
//! snapshots; random writes in successive windows right after a snapshot against the
//! same volume just before it; reads through 1, 10, 100 and 1000 snapshots against the same data in one
//! layer, with snapshot creation time and memory at each depth; snapshot creation time on
//! 1 GiB and 1 TiB sparse volumes; and the memory of the dirty maps. Prints one line per
//! figure and ends with `worst ratio: R`, the lowest ratio among the 0- and 1-snapshot
//! rows, the after-snapshot windows and the depth rows.
//!
//! Usage: bench-engine [DIR] [--seconds S] [--window S] [--only iops|after|depth|snapshot|memory]
//! (DIR defaults to ./target/bench-engine)

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapblk::engine::{AlignedBuf, CreateOptions, Volume, VolumeOpenOptions};

const BS: u64 = 4096;
const SIZE: u64 = 1 << 30;
const ROUNDS: usize = 3;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn block(&mut self, blocks: u64) -> u64 {
        self.next() % blocks
    }
}

/// Something that does 4 KiB random reads and writes.
trait Target {
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write(&self, off: u64, buf: &[u8]) -> Result<(), String>;
}

struct Raw(File);
impl Target for Raw {
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_exact_at(buf, off).map_err(|e| e.to_string())
    }
    fn write(&self, off: u64, buf: &[u8]) -> Result<(), String> {
        self.0.write_all_at(buf, off).map_err(|e| e.to_string())
    }
}

struct Engine(Volume);
impl Target for Engine {
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read(off, buf).map_err(|e| e.to_string())
    }
    fn write(&self, off: u64, buf: &[u8]) -> Result<(), String> {
        self.0.write(off, buf, false).map_err(|e| e.to_string())
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write,
}

/// IOPS of 4 KiB random `kind` on `t` for about `secs`.
fn iops(t: &dyn Target, kind: Kind, secs: f64, seed: u64) -> Result<f64, String> {
    let mut buf = AlignedBuf::new(BS as usize);
    buf.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i as u64 ^ seed) as u8);
    let mut rng = Rng(seed | 1);
    let blocks = SIZE / BS;
    let start = Instant::now();
    let mut n = 0u64;
    let limit = Duration::from_secs_f64(secs);
    loop {
        for _ in 0..64 {
            let off = rng.block(blocks) * BS;
            match kind {
                Kind::Read => t.read(off, &mut buf)?,
                Kind::Write => t.write(off, &buf)?,
            }
        }
        n += 64;
        if start.elapsed() >= limit {
            break;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn open_raw(path: &Path) -> Result<(File, bool), String> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    let mut d = o.clone();
    d.custom_flags(libc::O_DIRECT);
    match d.open(path) {
        Ok(f) => Ok((f, true)),
        Err(_) => o
            .open(path)
            .map(|f| (f, false))
            .map_err(|e| format!("{}: {e}", path.display())),
    }
}

fn fill(t: &dyn Target) -> Result<(), String> {
    let mut chunk = AlignedBuf::new(1 << 20);
    chunk
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 253) as u8 + 1);
    for i in 0..SIZE >> 20 {
        t.write(i << 20, &chunk)?;
    }
    Ok(())
}

fn rss_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn run(dir: &Path, secs: f64, window: f64, only: Option<&str>) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let want = |part: &str| only.is_none_or(|o| o == part);
    let mut worst = f64::INFINITY;
    if want("iops") {
        worst = bench_iops(dir, secs)?;
    }
    if want("after") {
        worst = worst.min(bench_after_snapshot(dir, window)?);
    }
    if want("depth") {
        worst = worst.min(bench_depth(dir, secs)?);
    }
    if want("snapshot") {
        bench_snapshot(dir)?;
    }
    if want("memory") {
        bench_memory(dir)?;
    }
    if want("iops") || want("after") || want("depth") {
        println!("worst ratio: {worst:.3}");
    }
    Ok(())
}

fn bench_iops(dir: &Path, secs: f64) -> Result<f64, String> {
    let raw_path = dir.join("raw.img");
    let _ = fs::remove_file(&raw_path);
    let (raw_file, direct) = open_raw(&raw_path)?;
    raw_file.set_len(SIZE).map_err(|e| e.to_string())?;
    let raw = Raw(raw_file);
    fill(&raw)?;
    println!(
        "setup: 1 GiB files in {}, {} I/O, 4 KiB random, queue depth 1, {ROUNDS} alternating rounds of {secs} s (median)",
        dir.display(),
        if direct { "O_DIRECT" } else { "buffered (O_DIRECT refused)" }
    );

    let mut worst = f64::INFINITY;
    for snaps in [0usize, 1, 100] {
        let vdir = dir.join(format!("vol-{snaps}"));
        let vol = filled_volume(dir, &format!("vol-{snaps}"))?;
        let eng = Engine(vol.clone());
        let mut rng = Rng(42);
        let mut buf = AlignedBuf::new(BS as usize);
        for s in 0..snaps {
            // Between snapshots, rewrite 0.5% of the blocks so every layer holds data.
            for _ in 0..(SIZE / BS) / 200 {
                buf[0] = s as u8;
                eng.write(rng.block(SIZE / BS) * BS, &buf)?;
            }
            vol.create_snapshot(&format!("s{s}"))
                .map_err(|e| e.to_string())?;
        }
        // After a snapshot the engine writes into a fresh, sparse head file, where the file
        // system allocates each block on first write; the like-for-like baseline is then a
        // fresh sparse file too. The overwrite baseline is printed beside it.
        let sparse_path = dir.join("raw-sparse.img");
        let _ = fs::remove_file(&sparse_path);
        let (sparse_file, _) = open_raw(&sparse_path)?;
        sparse_file.set_len(SIZE).map_err(|e| e.to_string())?;
        let sparse = Raw(sparse_file);
        for kind in [Kind::Write, Kind::Read] {
            let fresh_head = snaps > 0 && matches!(kind, Kind::Write);
            let (mut r, mut o, mut e) = (vec![], vec![], vec![]);
            for round in 0..ROUNDS {
                let seed = round as u64 * 7 + 1;
                r.push(iops(
                    if fresh_head { &sparse } else { &raw },
                    kind,
                    secs,
                    seed,
                )?);
                e.push(iops(&eng, kind, secs, seed)?);
                if fresh_head {
                    o.push(iops(&raw, kind, secs, seed)?);
                }
            }
            let (r, e) = (median(r), median(e));
            let ratio = e / r;
            let name = match kind {
                Kind::Read => "randread",
                Kind::Write => "randwrite",
            };
            let baseline = if fresh_head { "raw sparse" } else { "raw" };
            let extra = if fresh_head {
                let o = median(o);
                format!("  (raw overwrite {o:.0} IOPS, ratio {:.3})", e / o)
            } else {
                String::new()
            };
            println!(
                "{name:<9} 4k snapshots={snaps:<3} {baseline} {r:>9.0} IOPS  engine {e:>9.0} IOPS  ratio {ratio:.3}{extra}"
            );
            if snaps <= 1 {
                worst = worst.min(ratio);
            }
        }
        vol.close().map_err(|e| e.to_string())?;
        let _ = fs::remove_dir_all(&vdir);
        let _ = fs::remove_file(&sparse_path);
    }
    let _ = fs::remove_file(&raw_path);
    Ok(worst)
}

/// Random 4 KiB writes right after a snapshot, in successive windows of `window` seconds
/// from the first one on, each as a ratio to the same job on the same volume just before
/// the snapshot (every block already written: what the user had). First writes into the
/// new head are included: that is what a snapshot costs an application.
fn bench_after_snapshot(dir: &Path, window: f64) -> Result<f64, String> {
    let vol = filled_volume(dir, "after")?;
    let eng = Engine(vol.clone());
    // Settle: the same job once, so the baseline does not include a cold start.
    iops(&eng, Kind::Write, window / 4.0, 3)?;
    let before = iops(&eng, Kind::Write, window, 5)?;
    println!("after snapshot: 1 GiB volume, filled; randwrite 4k before the snapshot {before:.0} IOPS ({window} s)");
    vol.create_snapshot("after").map_err(|e| e.to_string())?;
    let mut worst = f64::INFINITY;
    for w in 0..3 {
        let got = iops(&eng, Kind::Write, window, 11 + w as u64)?;
        let ratio = got / before;
        worst = worst.min(ratio);
        println!(
            "randwrite 4k after snapshot, {:>3.0}-{:<3.0} s: {got:>9.0} IOPS  ratio {ratio:.3}  (head holds {:.0}% of the volume)",
            w as f64 * window,
            (w + 1) as f64 * window,
            vol.status().head_bytes as f64 * 100.0 / SIZE as f64
        );
    }
    vol.close().map_err(|e| e.to_string())?;
    let _ = fs::remove_dir_all(dir.join("after"));
    Ok(worst)
}

/// A fresh 1 GiB volume in `dir/name`, filled, opened for direct I/O.
fn filled_volume(dir: &Path, name: &str) -> Result<Volume, String> {
    let vdir = dir.join(name);
    let _ = fs::remove_dir_all(&vdir);
    Volume::create(
        &vdir,
        &CreateOptions {
            size: SIZE,
            block_size: BS as u32,
        },
    )
    .and_then(|v| v.close())
    .map_err(|e| e.to_string())?;
    let vol =
        Volume::open_with(&vdir, &VolumeOpenOptions { direct: true }).map_err(|e| e.to_string())?;
    fill(&Engine(vol.clone()))?;
    Ok(vol)
}

/// Random reads through a deep stack: one volume takes a snapshot after every batch of
/// writes, its twin gets the same writes and stays one layer deep (the baseline: the same
/// data without snapshots). At 1, 10, 100 and 1000 snapshots, the read ratio, the time of
/// the last snapshots and the process's memory.
fn bench_depth(dir: &Path, secs: f64) -> Result<f64, String> {
    let deep = filled_volume(dir, "depth-deep")?;
    let flat = filled_volume(dir, "depth-flat")?;
    // Between snapshots, rewrite 0.05% of the blocks (about 128 random 4 KiB writes):
    // every layer holds data, the stack's maps stay fragmented.
    let batch = (SIZE / BS) / 2000;
    let (mut rng, mut buf) = (Rng(4242), AlignedBuf::new(BS as usize));
    let rss0 = rss_kib();
    let mut worst = f64::INFINITY;
    let mut taken = 0usize;
    let mut times: Vec<f64> = vec![];
    println!("depth: 1 GiB volume, {batch} random 4 KiB writes between snapshots; baseline: a twin volume with the same writes and no snapshot");
    for depth in [1usize, 10, 100, 1000] {
        times.clear();
        while taken < depth {
            for _ in 0..batch {
                buf[0] = taken as u8;
                let off = rng.block(SIZE / BS) * BS;
                deep.write(off, &buf, false).map_err(|e| e.to_string())?;
                flat.write(off, &buf, false).map_err(|e| e.to_string())?;
            }
            let t = Instant::now();
            deep.create_snapshot(&format!("d{taken}"))
                .map_err(|e| e.to_string())?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            taken += 1;
        }
        let (mut f, mut d) = (vec![], vec![]);
        for round in 0..ROUNDS {
            let seed = round as u64 * 13 + depth as u64;
            f.push(iops(&Engine(flat.clone()), Kind::Read, secs, seed)?);
            d.push(iops(&Engine(deep.clone()), Kind::Read, secs, seed)?);
        }
        let (f, d) = (median(f), median(d));
        let ratio = d / f;
        worst = worst.min(ratio);
        let max = times.iter().cloned().fold(0.0, f64::max);
        println!(
            "randread  4k snapshots={depth:<4} one layer {f:>9.0} IOPS  {depth} snapshots {d:>9.0} IOPS  ratio {ratio:.3}  snapshot create median {:.3} ms max {max:.3} ms  RSS +{:.1} MiB",
            median(times.clone()),
            (rss_kib().saturating_sub(rss0)) as f64 / 1024.0
        );
    }
    for (vol, name) in [(deep, "depth-deep"), (flat, "depth-flat")] {
        vol.close().map_err(|e| e.to_string())?;
        let _ = fs::remove_dir_all(dir.join(name));
    }
    Ok(worst)
}

fn bench_snapshot(dir: &Path) -> Result<(), String> {
    for (label, size) in [("1 GiB", 1u64 << 30), ("1 TiB", 1u64 << 40)] {
        let vdir = dir.join("snap-time");
        let _ = fs::remove_dir_all(&vdir);
        let vol = Volume::create(
            &vdir,
            &CreateOptions {
                size,
                block_size: BS as u32,
            },
        )
        .map_err(|e| e.to_string())?;
        let mut times = vec![];
        let mut rng = Rng(7);
        let buf = vec![1u8; BS as usize];
        for i in 0..21 {
            for _ in 0..16 {
                vol.write(rng.block(size / BS) * BS, &buf, false)
                    .map_err(|e| e.to_string())?;
            }
            let t = Instant::now();
            vol.create_snapshot(&format!("t{i}"))
                .map_err(|e| e.to_string())?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let max = times.iter().cloned().fold(0.0, f64::max);
        println!("snapshot create, {label} sparse volume: median {:.3} ms, max {max:.3} ms (21 snapshots, 16 random writes before each)", median(times));
        drop(vol);
        let _ = fs::remove_dir_all(&vdir);
    }
    Ok(())
}

/// A fresh 1 TiB volume for measuring its maps.
fn map_volume(vdir: &Path) -> Result<Volume, String> {
    let _ = fs::remove_dir_all(vdir);
    Volume::create(
        vdir,
        &CreateOptions {
            size: 1 << 40,
            block_size: BS as u32,
        },
    )
    .map_err(|e| e.to_string())
}

/// Records a 4 KiB write of `block` in the maps without storing data.
fn mark_written(vol: &Volume, block: u64) -> Result<(), String> {
    vol.begin_write(block * BS, BS)
        .map_err(|e| e.to_string())?
        .complete()
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn bench_memory(dir: &Path) -> Result<(), String> {
    // Memory of the maps: the writes' data is not stored (it plays no part in the maps),
    // each write only reserves and completes its blocks.
    let vdir = dir.join("map-memory");
    let vol = map_volume(&vdir)?;
    let rss0 = rss_kib();
    let mut rng = Rng(99);
    let writes = 1_000_000u64;
    for _ in 0..writes {
        mark_written(&vol, rng.block((1 << 40) / BS))?;
    }
    vol.flush().map_err(|e| e.to_string())?;
    let st = vol.status();
    println!(
        "map memory after 1M random 4 KiB writes on a 1 TiB volume: {:.2} MiB ({:.1} bits per written block), process RSS +{:.1} MiB",
        st.map_bytes as f64 / (1 << 20) as f64,
        st.map_bytes as f64 * 8.0 / writes as f64,
        (rss_kib().saturating_sub(rss0)) as f64 / 1024.0
    );
    drop(vol);
    let vol = map_volume(&vdir)?;
    for i in 0..writes {
        mark_written(&vol, i)?;
    }
    vol.flush().map_err(|e| e.to_string())?;
    println!(
        "map memory after 1M sequential 4 KiB writes on a 1 TiB volume: {} bytes",
        vol.status().map_bytes
    );
    drop(vol);
    // Worst case: every other block of a 16 GiB region written (no runs to compress).
    let vol = map_volume(&vdir)?;
    let region = (16u64 << 30) / BS;
    for b in (0..region).step_by(2) {
        mark_written(&vol, b)?;
    }
    vol.flush().map_err(|e| e.to_string())?;
    let per_block = vol.status().map_bytes as f64 * 8.0 / region as f64;
    println!(
        "map memory, worst case (every other block of 16 GiB written): {per_block:.3} bits per volume block -> {:.1} MiB for a fully written 1 TiB volume",
        per_block * ((1u64 << 40) / BS) as f64 / 8.0 / (1 << 20) as f64
    );
    drop(vol);
    let _ = fs::remove_dir_all(&vdir);
    Ok(())
}

fn main() {
    let mut dir = PathBuf::from("target/bench-engine");
    let mut secs = 1.0;
    let mut window = 8.0;
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => match args.next().and_then(|s| s.parse().ok()) {
                Some(s) => secs = s,
                None => {
                    eprintln!("bench-engine: --seconds needs a number");
                    std::process::exit(2);
                }
            },
            "--window" => match args.next().and_then(|s| s.parse().ok()) {
                Some(s) => window = s,
                None => {
                    eprintln!("bench-engine: --window needs a number");
                    std::process::exit(2);
                }
            },
            "--only" => only = args.next(),
            "-h" | "--help" => {
                println!("usage: bench-engine [DIR] [--seconds S] [--window S] [--only iops|after|depth|snapshot|memory]\nBenchmarks the engine against raw pread/pwrite in DIR (default target/bench-engine).");
                return;
            }
            _ => dir = PathBuf::from(a),
        }
    }
    if let Err(e) = run(&dir, secs, window, only.as_deref()) {
        eprintln!("bench-engine: {e}");
        std::process::exit(1);
    }
}
