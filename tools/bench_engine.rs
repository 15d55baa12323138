//! Engine benchmark: 4 KiB random I/O through the engine against plain pread/pwrite on
//! the same kind of file (O_DIRECT where the file system allows it), with 0, 1 and 100
//! snapshots; snapshot creation time on 1 GiB and 1 TiB sparse volumes; and the memory
//! of the dirty maps. Prints one line per figure and ends with `worst ratio: R`, the
//! lowest engine/raw IOPS ratio among the 0- and 1-snapshot rows.
//!
//! Usage: bench-engine [DIR] [--seconds S] [--only iops|snapshot|memory]
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

fn run(dir: &Path, secs: f64, only: Option<&str>) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let want = |part: &str| only.is_none_or(|o| o == part);
    let mut worst = f64::INFINITY;
    if want("iops") {
        worst = bench_iops(dir, secs)?;
    }
    if want("snapshot") {
        bench_snapshot(dir)?;
    }
    if want("memory") {
        bench_memory(dir)?;
    }
    if want("iops") {
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
        let vol = Volume::open_with(&vdir, &VolumeOpenOptions { direct: true })
            .map_err(|e| e.to_string())?;
        let eng = Engine(vol.clone());
        fill(&eng)?;
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
            "--only" => only = args.next(),
            "-h" | "--help" => {
                println!("usage: bench-engine [DIR] [--seconds S] [--only iops|snapshot|memory]\nBenchmarks the engine against raw pread/pwrite in DIR (default target/bench-engine).");
                return;
            }
            _ => dir = PathBuf::from(a),
        }
    }
    if let Err(e) = run(&dir, secs, only.as_deref()) {
        eprintln!("bench-engine: {e}");
        std::process::exit(1);
    }
}
