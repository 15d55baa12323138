//! The daemon dies in the middle of a cut, a delete or a merge while writers keep going:
//! every write acknowledged before the death must read back after `--recover` (a ublk
//! device outlives its daemon, and the file system on it trusts every acknowledged write,
//! flushed or not), and no block may turn into zeros.
//!
//! "Death" drops the volume without any flush and reopens it, keeping the volatile
//! journals where production keeps them (in shared memory, named as in production; see
//! `common::scratch_with_shm_journals`), as after `kill -9` (not a power loss: the page
//! cache survives). Writer threads own disjoint block ranges, so each block's last
//! acknowledged version is known exactly. The fault hooks stop the metadata change at
//! every crash point until each writer has had more writes acknowledged, then kill it
//! there (or let it go on).
//!
//! Failing cases are shrunk and their seeds saved by proptest in
//! `tests/engine_crash_cut.proptest-regressions`; commit that file so they are replayed.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use snapblk::engine::{faults, CreateOptions, EngineError, Volume};

use common::{block_data, journals_in, scratch_with_shm_journals, versions};

const BS: usize = 4096;
const WRITERS: usize = 2;
/// Blocks each writer owns.
const PER_WRITER: usize = 12;
const BLOCKS: usize = WRITERS * PER_WRITER;

/// One acknowledged change: blocks `[start, start+len)` now hold `version + i`, or zeros
/// when `version` is 0.
#[derive(Debug, Clone, Copy)]
struct Acked {
    start: usize,
    len: usize,
    version: u64,
}

/// Writer threads that run while a metadata change does, each on its own blocks.
struct Writers {
    stop: Arc<AtomicBool>,
    progress: Arc<Vec<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<Result<Vec<Acked>, String>>>,
}

impl Writers {
    fn start(vol: &Volume, versions: &Arc<AtomicU64>, seed: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let progress: Arc<Vec<AtomicU64>> =
            Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
        let threads = (0..WRITERS)
            .map(|w| {
                let (vol, stop, progress, versions) = (
                    vol.clone(),
                    stop.clone(),
                    progress.clone(),
                    versions.clone(),
                );
                std::thread::spawn(move || {
                    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (w as u64 + 1);
                    let mut next = || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    let mut log = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let len = 1 + (next() % 3) as usize;
                        let start = w * PER_WRITER + (next() as usize % (PER_WRITER - len + 1));
                        let off = (start * BS) as u64;
                        let acked = if next() % 8 == 0 {
                            vol.discard(off, (len * BS) as u64)
                                .map_err(|e| format!("discard: {e}"))?;
                            Acked {
                                start,
                                len,
                                version: 0,
                            }
                        } else {
                            let v = versions.fetch_add(len as u64, Ordering::SeqCst);
                            let mut data = Vec::with_capacity(len * BS);
                            for i in 0..len {
                                data.extend(block_data(v + i as u64, BS));
                            }
                            vol.write(off, &data, false)
                                .map_err(|e| format!("write: {e}"))?;
                            Acked {
                                start,
                                len,
                                version: v,
                            }
                        };
                        log.push(acked);
                        progress[w].fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(log)
                })
            })
            .collect();
        Writers {
            stop,
            progress,
            threads,
        }
    }

    /// A hook for [`faults::on_step`]: at each crash point, waits until every writer has
    /// had `n` more writes acknowledged (so writes land between every two steps).
    fn hook(&self, n: u64) -> Box<dyn FnMut(&'static str)> {
        let progress = self.progress.clone();
        Box::new(move |what| {
            let base: Vec<u64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
            let t0 = Instant::now();
            while progress
                .iter()
                .zip(&base)
                .any(|(p, b)| p.load(Ordering::SeqCst) < b + n)
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "writes stalled while the metadata change stood at {what}"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    }

    /// Stops the writers; their acknowledged changes, each writer's in order.
    fn stop(self) -> Result<Vec<Vec<Acked>>, TestCaseError> {
        self.stop.store(true, Ordering::SeqCst);
        let mut logs = Vec::new();
        for t in self.threads {
            let log = t
                .join()
                .map_err(|_| TestCaseError::fail("a writer panicked"))?
                .map_err(|e| {
                    TestCaseError::fail(format!("an acknowledged-path I/O failed: {e}"))
                })?;
            logs.push(log);
        }
        Ok(logs)
    }
}

/// Per block, the versions written while a metadata change ran.
type During = Vec<HashSet<u64>>;

/// What a metadata change under test does.
#[derive(Debug, Clone)]
enum Op {
    /// Take a snapshot; the daemon dies at crash point `crash` (0: it does not).
    Snapshot {
        crash: u64,
    },
    /// Delete snapshot `idx` (modulo their number) and merge.
    Delete {
        idx: usize,
        crash: u64,
    },
    /// Run the merges.
    Maintain {
        crash: u64,
    },
    Flush,
    /// The daemon dies between two changes.
    Death,
    /// Take a snapshot in the three calls a freezing caller makes, with `between` done
    /// in a gap; the daemon dies at crash point `crash` of the whole (0: it does not).
    Staged {
        between: Between,
        crash: u64,
    },
}

/// What happens in the gaps of a staged cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Between {
    Nothing,
    /// The prepared cut is dropped (the freeze failed): nothing is taken.
    Abandon,
    /// Snapshot `idx` (modulo their number) is deleted between prepare and switch.
    Delete(usize),
    /// The merges run between prepare and switch.
    Maintain,
    /// A flush between switch and finish (which seals the old head first).
    Flush,
}

fn between() -> impl Strategy<Value = Between> {
    prop_oneof![
        Just(Between::Nothing),
        Just(Between::Abandon),
        any::<usize>().prop_map(Between::Delete),
        Just(Between::Maintain),
        Just(Between::Flush),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..14).prop_map(|crash| Op::Snapshot { crash }),
        2 => (any::<usize>(), 0u64..14).prop_map(|(idx, crash)| Op::Delete { idx, crash }),
        1 => (0u64..10).prop_map(|crash| Op::Maintain { crash }),
        1 => Just(Op::Flush),
        1 => Just(Op::Death),
        3 => (between(), 0u64..24).prop_map(|(between, crash)| Op::Staged { between, crash }),
    ]
}

/// Names of the files in the layers folder of volume folder `dir`.
fn layer_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("layers"))
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

struct Harness {
    dir: PathBuf,
    vol: Option<Volume>,
    versions: Arc<AtomicU64>,
    /// Each block's last acknowledged version (0: zeros).
    cur: Vec<u64>,
    /// Snapshots: name and content.
    snaps: Vec<(String, Vec<u64>)>,
    names: u64,
    seed: u64,
}

impl Harness {
    fn new(root: &Path, seed: u64) -> Harness {
        let dir = root.join("vol");
        let vol = Volume::create(
            &dir,
            &CreateOptions {
                size: (BLOCKS * BS) as u64,
                block_size: BS as u32,
            },
        )
        .expect("create");
        Harness {
            dir,
            vol: Some(vol),
            versions: Arc::new(AtomicU64::new(1)),
            cur: vec![0; BLOCKS],
            snaps: vec![],
            names: 0,
            seed,
        }
    }

    fn vol(&self) -> &Volume {
        self.vol.as_ref().expect("volume open")
    }

    fn read(&self, read: impl Fn(&mut [u8]) -> Result<(), EngineError>) -> Vec<u64> {
        let mut buf = vec![0u8; BLOCKS * BS];
        read(&mut buf).expect("read");
        versions(&buf, BS)
            .into_iter()
            .map(|v| v.unwrap_or(u64::MAX))
            .collect()
    }

    /// Applies the writers' logs to the model; returns, per block, the versions written
    /// while the change ran.
    fn absorb(&mut self, logs: Vec<Vec<Acked>>) -> During {
        let mut during = vec![HashSet::new(); BLOCKS];
        for log in logs {
            for a in log {
                for i in 0..a.len {
                    let v = if a.version == 0 {
                        0
                    } else {
                        a.version + i as u64
                    };
                    self.cur[a.start + i] = v;
                    during[a.start + i].insert(v);
                }
            }
        }
        during
    }

    /// Runs `change` with writers going and a death armed at crash point `crash`.
    /// Returns the change's result and the versions written meanwhile, per block.
    fn with_writers<T>(
        &mut self,
        crash: u64,
        change: impl FnOnce(&Volume) -> Result<T, EngineError>,
    ) -> Result<(Result<T, EngineError>, During), TestCaseError> {
        self.seed += 1;
        let writers = Writers::start(self.vol(), &self.versions, self.seed);
        faults::on_step(Some(writers.hook(2)));
        faults::crash_after(crash);
        let r = change(self.vol());
        faults::disarm();
        faults::on_step(None);
        let logs = writers.stop()?;
        Ok((r, self.absorb(logs)))
    }

    fn check_live(&self, when: &str) -> Result<(), TestCaseError> {
        let got = self.read(|b| self.vol().read(0, b));
        for (b, (&g, &w)) in got.iter().zip(&self.cur).enumerate() {
            prop_assert!(
                g == w,
                "{}: block {} reads version {} (u64::MAX: torn), the last acknowledged write was {}",
                when,
                b,
                g,
                w
            );
        }
        Ok(())
    }

    fn check_snapshots(&self, when: &str) -> Result<(), TestCaseError> {
        let listed: Vec<String> = self
            .vol()
            .list_snapshots()
            .into_iter()
            .map(|s| s.name)
            .collect();
        let model: Vec<String> = self.snaps.iter().map(|s| s.0.clone()).collect();
        prop_assert_eq!(listed, model, "{}: snapshot list", when);
        for (name, content) in &self.snaps {
            let got = self.read(|b| self.vol().read_snapshot(name, 0, b));
            prop_assert_eq!(&got, content, "{}: snapshot {}", when, name);
        }
        Ok(())
    }

    /// The daemon dies (nothing flushed, shared memory kept) and a new one recovers.
    fn death(&mut self, when: &str) -> Result<(), TestCaseError> {
        faults::disarm();
        self.vol = None;
        self.vol = Some(
            Volume::open(&self.dir)
                .map_err(|e| TestCaseError::fail(format!("{when}: recovery open: {e}")))?,
        );
        self.check_live(&format!("after a death {when}"))
    }

    /// Adopts snapshot `name` taken while writes ran: each block must hold its version
    /// from before the cut or one written during it.
    fn adopt(
        &mut self,
        name: String,
        before: &[u64],
        during: &[HashSet<u64>],
    ) -> Result<(), TestCaseError> {
        let got = self.read(|b| self.vol().read_snapshot(&name, 0, b));
        for b in 0..BLOCKS {
            prop_assert!(
                got[b] == before[b] || during[b].contains(&got[b]),
                "snapshot {} block {} reads {}: neither {} from before the cut nor one of {:?} written during it",
                name,
                b,
                got[b],
                before[b],
                during[b]
            );
        }
        self.snaps.push((name, got));
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op.clone() {
            Op::Snapshot { crash } => {
                self.names += 1;
                let name = format!("s{}", self.names);
                let before = self.cur.clone();
                let (r, during) = self.with_writers(crash, |v| v.create_snapshot(&name))?;
                let when = format!("cut of {name} killed at step {crash}");
                match r {
                    Ok(_) => self.adopt(name.clone(), &before, &during)?,
                    Err(EngineError::InjectedCrash(_)) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("{when}: {e}"))),
                }
                if crash > 0 {
                    let taken = self.snaps.iter().any(|s| s.0 == name);
                    self.death(&when)?;
                    let listed = self.vol().list_snapshots().iter().any(|s| s.name == name);
                    if listed && !taken {
                        self.adopt(name, &before, &during)?;
                    }
                    prop_assert!(!taken || listed, "{}: a finished cut was lost", when);
                }
                self.check_snapshots(&when)?;
            }
            Op::Delete { idx, crash } => {
                if self.snaps.is_empty() {
                    return Ok(());
                }
                let i = idx % self.snaps.len();
                let name = self.snaps[i].0.clone();
                let (r, _) = self.with_writers(crash, |v| v.delete_snapshot(&name))?;
                let when = format!("delete of {name} killed at step {crash}");
                match r {
                    Ok(()) => {
                        self.snaps.remove(i);
                    }
                    Err(EngineError::InjectedCrash(_)) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("{when}: {e}"))),
                }
                if crash > 0 {
                    self.death(&when)?;
                    let listed = self.vol().list_snapshots().iter().any(|s| s.name == name);
                    if !listed {
                        self.snaps.retain(|s| s.0 != name);
                    }
                }
                self.check_snapshots(&when)?;
            }
            Op::Maintain { crash } => {
                let (r, _) = self.with_writers(crash, |v| v.maintain())?;
                let when = format!("merge killed at step {crash}");
                match r {
                    Ok(()) | Err(EngineError::InjectedCrash(_)) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("{when}: {e}"))),
                }
                if crash > 0 {
                    self.death(&when)?;
                }
                self.check_snapshots(&when)?;
            }
            Op::Staged { between, crash } => {
                self.names += 1;
                let name = format!("s{}", self.names);
                let before = self.cur.clone();
                let victim = match between {
                    Between::Delete(idx) if !self.snaps.is_empty() => {
                        Some(self.snaps[idx % self.snaps.len()].0.clone())
                    }
                    _ => None,
                };
                let files_before = layer_files(&self.dir);
                let (r, during) = self.with_writers(crash, |v| {
                    let prepared = v.prepare_cut(&name)?;
                    let gap = match between {
                        Between::Abandon => {
                            drop(prepared);
                            return Ok(false);
                        }
                        Between::Delete(_) => match &victim {
                            Some(n) => v.delete_snapshot(n),
                            None => Ok(()),
                        },
                        Between::Maintain => v.maintain(),
                        Between::Nothing | Between::Flush => Ok(()),
                    };
                    if let Err(e) = gap {
                        prepared.drop_as_in_a_death();
                        return Err(e);
                    }
                    let pending = v.switch_cut(prepared)?;
                    if between == Between::Flush {
                        v.flush()?;
                    }
                    v.finish_cut(pending)?;
                    Ok(true)
                })?;
                let when = format!("staged cut of {name} ({between:?}) killed at step {crash}");
                match r {
                    Ok(true) => {
                        if let Some(n) = &victim {
                            self.snaps.retain(|s| &s.0 != n);
                        }
                        self.adopt(name.clone(), &before, &during)?;
                    }
                    Ok(false) => {
                        prop_assert_eq!(
                            layer_files(&self.dir),
                            files_before,
                            "{}: an abandoned cut left files",
                            when
                        );
                    }
                    Err(EngineError::InjectedCrash(_)) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("{when}: {e}"))),
                }
                if crash > 0 {
                    let taken = self.snaps.iter().any(|s| s.0 == name);
                    self.death(&when)?;
                    let listed: Vec<String> = self
                        .vol()
                        .list_snapshots()
                        .into_iter()
                        .map(|s| s.name)
                        .collect();
                    if let Some(n) = &victim {
                        if !listed.contains(n) {
                            self.snaps.retain(|s| &s.0 != n);
                        }
                    }
                    let is_listed = listed.contains(&name);
                    if is_listed && !taken {
                        prop_assert!(
                            between != Between::Abandon,
                            "{}: an abandoned cut was taken",
                            when
                        );
                        self.adopt(name.clone(), &before, &during)?;
                    }
                    prop_assert!(!taken || is_listed, "{}: a finished cut was lost", when);
                    // The open removes whatever files a death left that no manifest names.
                    let mut named = std::collections::BTreeSet::new();
                    for f in layer_files(&self.dir) {
                        if let Some(id) = f.split('.').next() {
                            named.insert(id.to_string());
                        }
                    }
                    let layers = self.vol().status().layers;
                    prop_assert!(
                        named.len() <= layers,
                        "{}: files of {} layers in the folder, {} in the stack: {:?}",
                        when,
                        named.len(),
                        layers,
                        layer_files(&self.dir)
                    );
                }
                self.check_snapshots(&when)?;
            }
            Op::Flush => {
                let (r, _) = self.with_writers(0, |v| v.flush())?;
                r.map_err(|e| TestCaseError::fail(format!("flush: {e}")))?;
            }
            Op::Death => {
                let (_, _) = self.with_writers(0, |_| Ok(()))?;
                self.death("between changes")?;
                self.check_snapshots("between changes")?;
            }
        }
        self.check_live(&format!("after {op:?}"))
    }
}

fn run(ops: Vec<Op>, seed: u64) -> Result<(), TestCaseError> {
    let (root, _) = scratch_with_shm_journals();
    let mut h = Harness::new(root.path(), seed);
    for op in &ops {
        h.apply(op)?;
    }
    h.death("at the end")?;
    h.check_snapshots("at the end")?;
    h.vol().maintain().expect("maintain");
    h.death("after the last merge")?;
    h.check_snapshots("after the last merge")
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map(|n| (n / 10).max(1))
        .unwrap_or(150)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 500, ..ProptestConfig::default() })]

    /// Random histories of cuts, deletes and merges killed at random steps, with writes.
    #[test]
    fn acknowledged_writes_survive_deaths_during_metadata_changes(
        ops in proptest::collection::vec(op(), 1..12),
        seed in any::<u64>(),
    ) {
        run(ops, seed)?;
    }
}

/// The daemon is killed at every step of a cut in turn, with writes acknowledged between
/// every two steps, then at every step of the second cut after that.
#[test]
fn a_death_at_every_step_of_a_cut_loses_no_acknowledged_write() {
    let (root, _) = scratch_with_shm_journals();
    // How many crash points a cut has.
    let probe = root.path().join("probe");
    let v = Volume::create(
        &probe,
        &CreateOptions {
            size: (BLOCKS * BS) as u64,
            block_size: BS as u32,
        },
    )
    .expect("create");
    v.write(0, &block_data(1, BS), false).expect("write");
    let before = faults::steps_taken();
    v.create_snapshot("probe").expect("snapshot");
    let steps = faults::steps_taken() - before;
    drop(v);
    assert!(steps >= 3, "a cut has only {steps} crash points");
    for crash in 1..=steps + 1 {
        let dir = root.path().join(format!("k{crash}"));
        std::fs::create_dir(&dir).expect("mkdir");
        let mut h = Harness::new(&dir, crash);
        let r = (|| {
            h.apply(&Op::Snapshot { crash: 0 })?;
            h.apply(&Op::Snapshot { crash })?;
            h.apply(&Op::Snapshot { crash })?;
            h.death("at the end")?;
            h.check_snapshots("at the end")
        })();
        if let Err(e) = r {
            panic!("killed at step {crash} of {steps}: {e}");
        }
    }
}

/// The daemon is killed at every step of a cut taken in three calls, with a snapshot
/// deleted or the merges run between prepare and switch (a merge removes the journals of
/// layers outside the stack, the prepared head's included), a flush between switch and
/// finish, or the prepared cut abandoned, with writes acknowledged between every two steps.
#[test]
fn a_death_at_every_step_of_a_staged_cut_loses_no_acknowledged_write() {
    let (root, _) = scratch_with_shm_journals();
    for between in [
        Between::Nothing,
        Between::Abandon,
        Between::Delete(0),
        Between::Maintain,
        Between::Flush,
    ] {
        for crash in 1..=24 {
            let dir = root.path().join(format!("{between:?}-{crash}"));
            std::fs::create_dir(&dir).expect("mkdir");
            let mut h = Harness::new(&dir, 2000 + crash);
            let r = (|| {
                h.apply(&Op::Snapshot { crash: 0 })?;
                h.apply(&Op::Staged { between, crash })?;
                h.apply(&Op::Staged {
                    between: Between::Nothing,
                    crash: 0,
                })?;
                h.death("at the end")?;
                h.check_snapshots("at the end")
            })();
            if let Err(e) = r {
                panic!("{between:?}: killed at step {crash}: {e}");
            }
        }
    }
}

/// Two deaths in a row before the first flush: the first during a cut (leaving the new
/// head's journal behind in shared memory), the second after the next cut. A stale
/// journal must never be replayed into a layer that reuses its id (the blocks it names
/// would read as zeros), and the journals of dead layers are removed at open.
#[test]
fn a_stale_journal_never_turns_blocks_into_zeros() {
    let (root, journals) = scratch_with_shm_journals();
    for crash in 1..=8 {
        let dir = root.path().join(format!("stale{crash}"));
        std::fs::create_dir(&dir).expect("mkdir");
        let mut h = Harness::new(&dir, 1000 + crash);
        let r = (|| {
            h.apply(&Op::Snapshot { crash: 0 })?;
            h.apply(&Op::Flush)?;
            h.apply(&Op::Snapshot { crash })?;
            let id = h.vol().id();
            let mine: Vec<String> = journals_in(journals)
                .into_iter()
                .filter(|n| n.contains(&id))
                .collect();
            prop_assert_eq!(
                mine.len(),
                1,
                "after the recovery, only the head's journal may remain: {:?}",
                mine
            );
            // The next cut's head must not adopt a stale journal, and a second death
            // before any flush must not replay one.
            h.apply(&Op::Snapshot { crash: 0 })?;
            h.death("a second time before a flush")?;
            h.check_snapshots("a second time before a flush")
        })();
        if let Err(e) = r {
            panic!("first death at step {crash}: {e}");
        }
    }
}
