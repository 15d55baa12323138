//! Model-based property test of the engine: random sequences of writes, discards, flushes,
//! snapshots, deletes, clones, grows, reads, merges and crashes (also in the middle of
//! metadata changes), each checked against a simple in-memory model after every step.
//! The volume starts smaller than the largest size requests name, so requests past the end
//! are checked to be refused, and grows make them valid; snapshots and clones keep the size
//! they were taken with.
//!
//! A process crash drops the volume without flushing and reopens it: every acknowledged
//! write must still be there (a ublk device outlives its daemon, and the file system on it
//! trusts what was acknowledged). A power loss also loses the page cache's volatile
//! journal (simulated by deleting it): every block must then read as its value at the last
//! flush or as a value written after it (what a block device may legally return), and
//! nothing flushed may be lost.
//!
//! Failing cases are shrunk and their seeds saved by proptest in
//! `tests/engine_model.proptest-regressions`; commit that file so they are replayed.
//! More cases: `PROPTEST_CASES=20000 cargo test --release --test engine_model`.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use snapblk::engine::{faults, CreateOptions, EngineError, Volume};

use common::{block_data, scratch, versions};

/// Largest size the volume grows to, in blocks; requests range over it.
const BLOCKS: usize = 40;
/// Size the volume is created with, in blocks.
const INITIAL_BLOCKS: usize = 24;
const MAX_LEN: usize = 6;

#[derive(Debug, Clone)]
enum MetaOp {
    Snapshot,
    Delete(usize),
    Clone(usize),
    Resize(usize),
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        start: usize,
        len: usize,
        fua: bool,
    },
    Discard {
        start: usize,
        len: usize,
    },
    WriteZeroes {
        start: usize,
        len: usize,
    },
    Flush,
    Snapshot,
    Delete(usize),
    Clone(usize),
    WriteClone {
        clone: usize,
        start: usize,
        len: usize,
    },
    ReadSnapshots,
    Changed(usize, usize),
    /// Grow by this many blocks (0: the same size, a no-op), up to BLOCKS.
    Resize(usize),
    Maintain,
    Crash,
    PowerLoss,
    CrashDuring {
        op: MetaOp,
        step: u64,
    },
}

fn range() -> impl Strategy<Value = (usize, usize)> {
    (1..=MAX_LEN).prop_flat_map(|len| (0..=BLOCKS - len, Just(len)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<bool>()).prop_map(|((start, len), fua)| Op::Write { start, len, fua: fua && len % 3 == 0 }),
        2 => range().prop_map(|(start, len)| Op::Discard { start, len }),
        1 => range().prop_map(|(start, len)| Op::WriteZeroes { start, len }),
        2 => Just(Op::Flush),
        3 => Just(Op::Snapshot),
        2 => any::<usize>().prop_map(Op::Delete),
        1 => any::<usize>().prop_map(Op::Clone),
        1 => (any::<usize>(), range()).prop_map(|(clone, (start, len))| Op::WriteClone { clone, start, len }),
        1 => Just(Op::ReadSnapshots),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Changed(a, b)),
        2 => (0..=8usize).prop_map(Op::Resize),
        1 => Just(Op::Maintain),
        1 => Just(Op::Crash),
        2 => Just(Op::PowerLoss),
        2 => (prop_oneof![Just(MetaOp::Snapshot), any::<usize>().prop_map(MetaOp::Delete), any::<usize>().prop_map(MetaOp::Clone), (1..=8usize).prop_map(MetaOp::Resize)], 1u64..12)
            .prop_map(|(op, step)| Op::CrashDuring { op, step }),
    ]
}

/// What the model knows of one snapshot.
#[derive(Debug, Clone)]
struct ModelSnap {
    name: String,
    content: Vec<u64>,
    /// Blocks changed between the previous snapshot and this one: surely / possibly
    /// (a crash makes unflushed changes uncertain).
    touched_min: BTreeSet<usize>,
    touched_max: BTreeSet<usize>,
    maybe_allocated: BTreeSet<usize>,
}

struct ModelClone {
    dir: PathBuf,
    vol: Volume,
    content: Vec<u64>,
}

struct Harness {
    dir: PathBuf,
    root: PathBuf,
    bs: usize,
    vol: Option<Volume>,
    next_version: u64,
    cur: Vec<u64>,
    durable: Vec<u64>,
    since_flush: Vec<HashSet<u64>>,
    head_min: BTreeSet<usize>,
    head_max: BTreeSet<usize>,
    /// Blocks changed since the last flush (certain once flushed, uncertain after a crash).
    touched_since_flush: BTreeSet<usize>,
    /// Blocks that read as zeros after a crash lost their discard's journal record: a map
    /// may still call them allocated (holding zeros). Kept for good, because the engine
    /// flushes more often than the model knows (merges flush), so the model cannot tell
    /// when a later write or discard of the block has made it certain again.
    maybe_allocated: BTreeSet<usize>,
    snaps: Vec<ModelSnap>,
    clones: Vec<ModelClone>,
    names: u64,
}

impl Harness {
    fn new(root: &Path, bs: usize) -> Harness {
        let dir = root.join("vol");
        let vol = Volume::create(
            &dir,
            &CreateOptions {
                size: (INITIAL_BLOCKS * bs) as u64,
                block_size: bs as u32,
            },
        )
        .expect("create");
        Harness {
            dir,
            root: root.to_path_buf(),
            bs,
            vol: Some(vol),
            next_version: 1,
            cur: vec![0; INITIAL_BLOCKS],
            durable: vec![0; INITIAL_BLOCKS],
            since_flush: vec![HashSet::new(); INITIAL_BLOCKS],
            head_min: BTreeSet::new(),
            head_max: BTreeSet::new(),
            touched_since_flush: BTreeSet::new(),
            maybe_allocated: BTreeSet::new(),
            snaps: vec![],
            clones: vec![],
            names: 0,
        }
    }

    fn vol(&self) -> &Volume {
        self.vol.as_ref().expect("volume open")
    }

    /// The volume's size in blocks, as the model knows it.
    fn blocks(&self) -> usize {
        self.cur.len()
    }

    /// The model grows to `n` blocks: the new ones read as zeros.
    fn grown(&mut self, n: usize) {
        self.cur.resize(n, 0);
        self.durable.resize(n, 0);
        self.since_flush.resize(n, HashSet::new());
    }

    /// Grows the volume by `by` blocks (capped at BLOCKS).
    fn resize(&mut self, by: usize) -> Result<(), EngineError> {
        let n = (self.blocks() + by).min(BLOCKS);
        self.vol().resize((n * self.bs) as u64)?;
        self.grown(n);
        Ok(())
    }

    /// Checks that a request reaching past the end is refused; true if it was in range.
    fn in_range(
        &self,
        start: usize,
        len: usize,
        blocks: usize,
        r: Result<(), EngineError>,
    ) -> Result<bool, TestCaseError> {
        if start + len <= blocks {
            prop_assert!(r.is_ok(), "request in range failed: {:?}", r.err());
            return Ok(true);
        }
        prop_assert!(
            matches!(r, Err(EngineError::OutOfRange { .. })),
            "request past the end ({} + {} > {}) gave {:?}",
            start,
            len,
            blocks,
            r
        );
        Ok(false)
    }

    fn set(&mut self, start: usize, len: usize, v: Option<u64>) {
        for b in start..start + len {
            let val = v.map(|x| x + (b - start) as u64).unwrap_or(0);
            self.cur[b] = val;
            self.since_flush[b].insert(val);
            self.head_max.insert(b);
            self.touched_since_flush.insert(b);
        }
    }

    fn flushed(&mut self) {
        self.durable = self.cur.clone();
        self.since_flush.iter_mut().for_each(HashSet::clear);
        self.head_min.append(&mut self.touched_since_flush);
    }

    fn write_data(&mut self, len: usize) -> (Vec<u8>, u64) {
        let v = self.next_version;
        self.next_version += len as u64;
        let mut data = Vec::with_capacity(len * self.bs);
        for i in 0..len {
            data.extend(block_data(v + i as u64, self.bs));
        }
        (data, v)
    }

    fn read_all(
        &self,
        blocks: usize,
        read: impl Fn(&mut [u8]) -> Result<(), EngineError>,
    ) -> Vec<Option<u64>> {
        let mut buf = vec![0u8; blocks * self.bs];
        read(&mut buf).expect("read");
        versions(&buf, self.bs)
    }

    fn check_live(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.vol().size(), (self.blocks() * self.bs) as u64);
        let got = self.read_all(self.blocks(), |b| self.vol().read(0, b));
        let want: Vec<_> = self.cur.iter().map(|&v| Some(v)).collect();
        prop_assert_eq!(got, want, "live volume differs from the model");
        Ok(())
    }

    /// Names of the snapshots the engine lists.
    fn listed(&self) -> Vec<String> {
        self.vol()
            .list_snapshots()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    fn check_snapshots(&self) -> Result<(), TestCaseError> {
        let listed = self.listed();
        let model: Vec<String> = self.snaps.iter().map(|s| s.name.clone()).collect();
        prop_assert_eq!(listed, model, "snapshot list differs");
        let bs = self.bs as u64;
        for s in &self.snaps {
            let n = s.content.len();
            let info = self.vol().snapshot_info(&s.name).expect("info");
            prop_assert_eq!(info.size, n as u64 * bs, "size of snapshot {}", &s.name);
            let mut one = vec![0u8; self.bs];
            prop_assert!(
                self.vol()
                    .read_snapshot(&s.name, n as u64 * bs, &mut one)
                    .is_err(),
                "read past the end of snapshot {}",
                &s.name
            );
            let got = self.read_all(n, |b| self.vol().read_snapshot(&s.name, 0, b));
            let want: Vec<_> = s.content.iter().map(|&v| Some(v)).collect();
            prop_assert_eq!(got, want, "snapshot {} differs", s.name);
            let alloc = self.vol().allocated_extents(&s.name).expect("allocated");
            let mut blocks = BTreeSet::new();
            for e in alloc {
                for b in e.offset / self.bs as u64..(e.offset + e.length) / self.bs as u64 {
                    blocks.insert(b as usize);
                }
            }
            let min: BTreeSet<usize> = (0..n).filter(|&b| s.content[b] != 0).collect();
            let max: BTreeSet<usize> = min.union(&s.maybe_allocated).copied().collect();
            prop_assert!(
                min.is_subset(&blocks) && blocks.is_subset(&max),
                "allocated blocks of {}: {:?} not between {:?} and {:?}",
                s.name,
                blocks,
                min,
                max
            );
        }
        for c in &self.clones {
            prop_assert_eq!(c.vol.size(), c.content.len() as u64 * bs);
            let got = self.read_all(c.content.len(), |b| c.vol.read(0, b));
            let want: Vec<_> = c.content.iter().map(|&v| Some(v)).collect();
            prop_assert_eq!(got, want, "clone {} differs", c.dir.display());
        }
        Ok(())
    }

    /// Drops the volume as a power loss would (the page cache, and with it the volatile
    /// journal, is gone) and reopens it; checks what a power loss may do.
    fn crash(&mut self) -> Result<(), TestCaseError> {
        faults::disarm();
        let prefix = format!("snapblk-{}-", self.vol().id());
        self.vol = None;
        // scratch() keeps the volatile journals in the layers folder; /dev/shm otherwise.
        for dir in [PathBuf::from("/dev/shm"), self.dir.join("layers")] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".vlog") && (dir.ends_with("layers") || name.starts_with(&prefix))
                {
                    std::fs::remove_file(e.path())
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
        }
        self.vol =
            Some(Volume::open(&self.dir).map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?);
        // A grow is durable when it returns; one interrupted may or may not have happened.
        let size = self.vol().size();
        let n = (size / self.bs as u64) as usize;
        prop_assert!(
            n >= self.blocks(),
            "the volume shrank from {} to {} blocks in a crash",
            self.blocks(),
            n
        );
        self.grown(n);
        let got = self.read_all(n, |b| self.vol().read(0, b));
        for (b, read) in got.into_iter().enumerate() {
            let v = read
                .ok_or_else(|| TestCaseError::fail(format!("block {b} is torn after a crash")))?;
            prop_assert!(
                v == self.durable[b] || self.since_flush[b].contains(&v),
                "block {} reads version {} after a crash; flushed {}, written since {:?}",
                b,
                v,
                self.durable[b],
                self.since_flush[b]
            );
            if v == 0 && (self.durable[b] != 0 || self.since_flush[b].iter().any(|&x| x != 0)) {
                self.maybe_allocated.insert(b);
            }
            self.cur[b] = v;
        }
        self.durable = self.cur.clone();
        self.since_flush.iter_mut().for_each(HashSet::clear);
        self.touched_since_flush.clear();
        Ok(())
    }

    fn new_name(&mut self) -> String {
        self.names += 1;
        format!("snap-{}", self.names)
    }

    fn snapshot(&mut self) -> Result<(), EngineError> {
        let name = self.new_name();
        self.vol().create_snapshot(&name)?;
        self.flushed();
        self.snaps.push(ModelSnap {
            name,
            content: self.cur.clone(),
            touched_min: std::mem::take(&mut self.head_min),
            touched_max: std::mem::take(&mut self.head_max),
            maybe_allocated: self.maybe_allocated.clone(),
        });
        Ok(())
    }

    fn delete(&mut self, idx: usize) -> Result<(), EngineError> {
        let name = self.snaps[idx].name.clone();
        self.vol().delete_snapshot(&name)?;
        self.forget_snapshot(idx);
        Ok(())
    }

    fn forget_snapshot(&mut self, idx: usize) {
        let gone = self.snaps.remove(idx);
        let (min, max) = match self.snaps.get_mut(idx) {
            Some(next) => (&mut next.touched_min, &mut next.touched_max),
            None => (&mut self.head_min, &mut self.head_max),
        };
        min.extend(gone.touched_min);
        max.extend(gone.touched_max);
    }

    fn clone_snap(&mut self, idx: usize) -> Result<(), EngineError> {
        let dir = self.root.join(format!(
            "clone-{}",
            self.clones.len() + self.names as usize * 100
        ));
        let vol = self.vol().clone_snapshot(&self.snaps[idx].name, &dir)?;
        self.clones.push(ModelClone {
            dir,
            vol,
            content: self.snaps[idx].content.clone(),
        });
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let bs = self.bs as u64;
        match op.clone() {
            Op::Write { start, len, fua } => {
                let (data, v) = self.write_data(len);
                let r = self.vol().write(start as u64 * bs, &data, fua);
                if self.in_range(start, len, self.blocks(), r)? {
                    self.set(start, len, Some(v));
                    if fua {
                        self.flushed();
                    }
                }
            }
            Op::Discard { start, len } => {
                let r = self.vol().discard(start as u64 * bs, len as u64 * bs);
                if self.in_range(start, len, self.blocks(), r)? {
                    self.set(start, len, None);
                }
            }
            Op::WriteZeroes { start, len } => {
                let r = self.vol().write_zeroes(start as u64 * bs, len as u64 * bs);
                if self.in_range(start, len, self.blocks(), r)? {
                    self.set(start, len, None);
                }
            }
            Op::Resize(by) => {
                self.resize(by).expect("resize");
                self.check_snapshots()?;
            }
            Op::Flush => {
                self.vol().flush().expect("flush");
                self.flushed();
            }
            Op::Snapshot => self.snapshot().expect("snapshot"),
            Op::Delete(i) => {
                if !self.snaps.is_empty() {
                    self.delete(i % self.snaps.len()).expect("delete");
                    self.check_snapshots()?;
                }
            }
            Op::Clone(i) => {
                if !self.snaps.is_empty() && self.clones.len() < 3 {
                    self.clone_snap(i % self.snaps.len()).expect("clone");
                }
            }
            Op::WriteClone { clone, start, len } => {
                if !self.clones.is_empty() {
                    let (data, v) = self.write_data(len);
                    let c = clone % self.clones.len();
                    let r = self.clones[c].vol.write(start as u64 * bs, &data, false);
                    if self.in_range(start, len, self.clones[c].content.len(), r)? {
                        for b in start..start + len {
                            self.clones[c].content[b] = v + (b - start) as u64;
                        }
                    }
                }
            }
            Op::ReadSnapshots => self.check_snapshots()?,
            Op::Changed(a, b) => {
                let n = self.snaps.len();
                if n >= 2 {
                    let (i, j) = (a % n, b % n);
                    let (i, j) = (i.min(j), i.max(j));
                    let r = self
                        .vol()
                        .changed_extents(&self.snaps[i].name, &self.snaps[j].name);
                    if i == j {
                        prop_assert!(
                            r.is_err(),
                            "changed blocks of a snapshot against itself must be refused"
                        );
                    } else {
                        let mut got = BTreeSet::new();
                        for e in r.expect("changed") {
                            for blk in e.offset / bs..(e.offset + e.length) / bs {
                                got.insert(blk as usize);
                            }
                        }
                        let mut min = BTreeSet::new();
                        let mut max = BTreeSet::new();
                        for s in &self.snaps[i + 1..=j] {
                            min.extend(s.touched_min.iter().copied());
                            max.extend(s.touched_max.iter().copied());
                        }
                        prop_assert!(
                            min.is_subset(&got) && got.is_subset(&max),
                            "changed blocks {:?} not between {:?} and {:?}",
                            got,
                            min,
                            max
                        );
                    }
                }
            }
            Op::Maintain => {
                self.vol().maintain().expect("maintain");
                self.check_snapshots()?;
            }
            Op::Crash => {
                // The process dies; the page cache (and the machine) live on: nothing
                // acknowledged may be lost, flushed or not.
                faults::disarm();
                self.vol = None;
                self.vol = Some(
                    Volume::open(&self.dir)
                        .map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?,
                );
                self.check_live()?;
                self.check_snapshots()?;
            }
            Op::PowerLoss => {
                self.crash()?;
                self.check_snapshots()?;
            }
            Op::CrashDuring { op, step } => {
                faults::crash_after(step);
                let result = match op {
                    MetaOp::Snapshot => {
                        let name = format!("snap-{}", self.names + 1);
                        let r = self.snapshot();
                        if r.is_err() {
                            // The cut flushed (or not) before the crash: either is allowed.
                            self.crash()?;
                            let listed = self.listed();
                            if listed.contains(&name) {
                                self.snaps.push(ModelSnap {
                                    name,
                                    content: self.cur.clone(),
                                    touched_min: std::mem::take(&mut self.head_min),
                                    touched_max: std::mem::take(&mut self.head_max),
                                    maybe_allocated: self.maybe_allocated.clone(),
                                });
                            }
                            self.check_snapshots()?;
                            return Ok(());
                        }
                        r
                    }
                    MetaOp::Delete(i) if !self.snaps.is_empty() => {
                        let idx = i % self.snaps.len();
                        let name = self.snaps[idx].name.clone();
                        let r = self.delete(idx);
                        if r.is_err() {
                            self.crash()?;
                            let listed = self.listed();
                            if !listed.contains(&name) {
                                self.forget_snapshot(idx);
                            }
                            self.check_snapshots()?;
                            return Ok(());
                        }
                        r
                    }
                    MetaOp::Resize(by) => {
                        let old = self.blocks();
                        let r = self.resize(by);
                        if r.is_err() {
                            // crash() adopts the size found on reopening: old or new.
                            self.crash()?;
                            let n = self.blocks();
                            prop_assert!(
                                n == old || n == (old + by).min(BLOCKS),
                                "an interrupted grow from {} by {} left {} blocks",
                                old,
                                by,
                                n
                            );
                            self.check_snapshots()?;
                            return Ok(());
                        }
                        r
                    }
                    MetaOp::Clone(i) if !self.snaps.is_empty() && self.clones.len() < 3 => {
                        let idx = i % self.snaps.len();
                        let dir = self.root.join(format!(
                            "clone-{}",
                            self.clones.len() + self.names as usize * 100
                        ));
                        let r = self.clone_snap(idx);
                        if r.is_err() {
                            faults::disarm();
                            // A clone is either whole or absent.
                            if dir.exists() {
                                let vol = Volume::open(&dir).map_err(|e| {
                                    TestCaseError::fail(format!(
                                        "half-made clone {}: {e}",
                                        dir.display()
                                    ))
                                })?;
                                self.clones.push(ModelClone {
                                    dir,
                                    vol,
                                    content: self.snaps[idx].content.clone(),
                                });
                            }
                            self.crash()?;
                            self.check_snapshots()?;
                            return Ok(());
                        }
                        r
                    }
                    _ => Ok(()),
                };
                faults::disarm();
                prop_assert!(result.is_ok(), "unexpected error {:?}", result.err());
            }
        }
        self.check_live()
    }
}

fn run(ops: Vec<Op>, bs: usize) -> Result<(), TestCaseError> {
    let root = scratch();
    let mut h = Harness::new(root.path(), bs);
    for op in &ops {
        h.apply(op)?;
    }
    h.vol().maintain().expect("maintain");
    h.check_snapshots()?;
    h.crash()?;
    h.check_snapshots()?;
    faults::disarm();
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 4000, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model_4k(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, 4096)?;
    }

    #[test]
    fn engine_matches_model_512(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, 512)?;
    }
}
