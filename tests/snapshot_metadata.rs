//! Changed-block tracking against the truth, on random histories: writes, discards,
//! snapshots, snapshot deletes (which merge layers), restores and clones (at any depth).
//!
//! The model keeps, per volume and per snapshot, the last operation of every block (each
//! write or discard has a unique number). The truth is then:
//! - allocated ranges of a snapshot: the blocks whose last operation is a write;
//! - changed ranges from base to target: the blocks whose last operation differs, when the
//!   target descends from the base (same volume and older, or the target's volume restored
//!   or cloned, at any depth, from a snapshot the base is not newer than); any other pair
//!   must be refused (Unrelated), and a deleted snapshot is not found.
//!
//! Answers are read from the volume folders' files while the volumes are open (as a node
//! plugin reads a served volume), and paged as the node agent pages them: every page
//! within max_results, no range before starting_offset, and pages resumed from the end
//! of the last range received concatenate to the whole answer.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use proptest::prelude::*;
use snapblk::csi::agent::Pages;
use snapblk::engine::{self, CreateOptions, EngineError, Extent, Volume};

const BS: u32 = 512;
/// Blocks of every volume: past one roaring container (65536 blocks), so runs cross
/// container boundaries.
const BLOCKS: u64 = 131_100;
/// Where writes land: a few hot regions, two of them across container boundaries.
const REGIONS: [u64; 3] = [0, 65_530, 131_066];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    Never,
    Data(u64),
    Zero(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        vol: u8,
        region: u8,
        at: u8,
        len: u8,
    },
    Discard {
        vol: u8,
        region: u8,
        at: u8,
        len: u8,
    },
    Snapshot {
        vol: u8,
    },
    Delete {
        vol: u8,
        which: u8,
    },
    /// A restore of a snapshot.
    Restore {
        vol: u8,
        which: u8,
    },
    /// A clone of the volume as it is: a snapshot taken, cloned, and deleted.
    Clone {
        vol: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u8>(), any::<u8>(), 0u8..34, 1u8..9).prop_map(|(vol, region, at, len)| Op::Write { vol, region, at, len }),
        2 => (any::<u8>(), any::<u8>(), 0u8..34, 1u8..9).prop_map(|(vol, region, at, len)| Op::Discard { vol, region, at, len }),
        3 => any::<u8>().prop_map(|vol| Op::Snapshot { vol }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(vol, which)| Op::Delete { vol, which }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(vol, which)| Op::Restore { vol, which }),
        1 => any::<u8>().prop_map(|vol| Op::Clone { vol }),
    ]
}

struct Snap {
    id: u64,
    name: String,
    cells: Vec<Cell>,
}

struct ModelVolume {
    dir: PathBuf,
    vol: Volume,
    cells: Vec<Cell>,
    snaps: Vec<Snap>,
    /// The volume and snapshot id it was restored or cloned from.
    parent: Option<(usize, u64)>,
    next_snap: u64,
}

struct World {
    _tmp: tempfile::TempDir,
    vols: Vec<ModelVolume>,
    next_op: u64,
    made: u64,
}

impl World {
    fn new() -> World {
        let tmp = common::scratch();
        let dir = tmp.path().join("v0");
        let vol = Volume::create(
            &dir,
            &CreateOptions {
                size: BLOCKS * u64::from(BS),
                block_size: BS,
            },
        )
        .expect("create");
        World {
            _tmp: tmp,
            vols: vec![ModelVolume {
                dir,
                vol,
                cells: vec![Cell::Never; BLOCKS as usize],
                snaps: vec![],
                parent: None,
                next_snap: 1,
            }],
            next_op: 1,
            made: 1,
        }
    }

    fn snapshot(&mut self, v: usize) -> u64 {
        let m = &mut self.vols[v];
        let name = format!("s{}", m.next_snap);
        let info = m.vol.create_snapshot(&name).expect("snapshot").snapshot;
        m.next_snap += 1;
        m.snaps.push(Snap {
            id: info.id,
            name,
            cells: m.cells.clone(),
        });
        info.id
    }

    fn clone_from(&mut self, v: usize, snap: usize) {
        let dir = self._tmp.path().join(format!("v{}", self.made));
        self.made += 1;
        let (name, id, cells) = {
            let s = &self.vols[v].snaps[snap];
            (s.name.clone(), s.id, s.cells.clone())
        };
        let vol = self.vols[v].vol.clone_snapshot(&name, &dir).expect("clone");
        self.vols.push(ModelVolume {
            dir,
            vol,
            cells,
            snaps: vec![],
            parent: Some((v, id)),
            next_snap: 1,
        });
    }

    fn apply(&mut self, op: &Op) {
        let nv = self.vols.len();
        match *op {
            Op::Write {
                vol,
                region,
                at,
                len,
            }
            | Op::Discard {
                vol,
                region,
                at,
                len,
            } => {
                let v = vol as usize % nv;
                let start = REGIONS[region as usize % REGIONS.len()] + u64::from(at);
                let end = (start + u64::from(len)).min(BLOCKS);
                let id = self.next_op;
                self.next_op += 1;
                let m = &mut self.vols[v];
                let (off, bytes) = (start * u64::from(BS), (end - start) * u64::from(BS));
                let cell = if matches!(op, Op::Write { .. }) {
                    let data = common::block_data(id, bytes as usize);
                    m.vol.write(off, &data, false).expect("write");
                    Cell::Data(id)
                } else {
                    m.vol.discard(off, bytes).expect("discard");
                    Cell::Zero(id)
                };
                for c in &mut m.cells[start as usize..end as usize] {
                    *c = cell;
                }
            }
            Op::Snapshot { vol } => {
                self.snapshot(vol as usize % nv);
            }
            Op::Delete { vol, which } => {
                let m = &mut self.vols[vol as usize % nv];
                if m.snaps.is_empty() {
                    return;
                }
                let s = m.snaps.remove(which as usize % m.snaps.len());
                m.vol.delete_snapshot(&s.name).expect("delete");
            }
            Op::Restore { vol, which } => {
                let v = vol as usize % nv;
                if self.vols[v].snaps.is_empty() || nv >= 5 {
                    return;
                }
                let snap = which as usize % self.vols[v].snaps.len();
                self.clone_from(v, snap);
            }
            Op::Clone { vol } => {
                let v = vol as usize % nv;
                if nv >= 5 {
                    return;
                }
                self.snapshot(v);
                let snap = self.vols[v].snaps.len() - 1;
                self.clone_from(v, snap);
                let s = self.vols[v].snaps.remove(snap);
                self.vols[v].vol.delete_snapshot(&s.name).expect("delete");
            }
        }
    }

    /// Whether snapshot `bid` of volume `b` is an ancestor of snapshot `tid` of `t`.
    fn descends(&self, b: usize, bid: u64, t: usize, tid: u64) -> bool {
        let (mut vol, mut newest) = (t, tid.checked_sub(1));
        loop {
            if vol == b {
                return newest.is_some_and(|n| bid <= n);
            }
            match self.vols[vol].parent {
                Some((p, s)) => {
                    vol = p;
                    newest = Some(s);
                }
                None => return false,
            }
        }
    }

    fn check(&self, seed: u64) {
        for (vi, v) in self.vols.iter().enumerate() {
            for s in &v.snaps {
                let truth = blocks_where(&s.cells, |c| matches!(c, Cell::Data(_)));
                let make = || engine::allocated_runs(&v.dir, s.id).expect("allocated");
                assert_eq!(make().size(), BLOCKS * u64::from(BS));
                check_pages(make, &truth, seed ^ s.id);
                let expect = engine_extents(v.vol.allocated_extents(&s.name).expect("vec"));
                assert_eq!(to_blocks(&expect), truth, "the volume's own answer");
                for (ti, t) in self.vols.iter().enumerate() {
                    for ts in &t.snaps {
                        let r = engine::changed_runs(&v.dir, s.id, &t.dir, ts.id);
                        if self.descends(vi, s.id, ti, ts.id) {
                            let truth: BTreeSet<u64> = (0..BLOCKS)
                                .filter(|&i| s.cells[i as usize] != ts.cells[i as usize])
                                .collect();
                            if let Err(e) = r {
                                panic!("v{vi}#{} -> v{ti}#{}: {e}", s.id, ts.id);
                            }
                            let make = || {
                                engine::changed_runs(&v.dir, s.id, &t.dir, ts.id).expect("delta")
                            };
                            check_pages(make, &truth, seed ^ ts.id);
                        } else {
                            match r {
                                Err(EngineError::Unrelated(_)) => {}
                                Err(EngineError::Invalid(_)) if vi == ti => {}
                                Err(e) => panic!("v{vi}#{} -> v{ti}#{}: {e}", s.id, ts.id),
                                Ok(_) => panic!(
                                    "v{vi}#{} -> v{ti}#{}: answered for unrelated snapshots",
                                    s.id, ts.id
                                ),
                            }
                        }
                    }
                }
            }
            // A deleted snapshot (or one never made) is not found.
            let gone = v.next_snap + 100;
            assert!(matches!(
                engine::allocated_runs(&v.dir, gone),
                Err(EngineError::SnapshotIdNotFound(_))
            ));
            if let Some(s) = v.snaps.last() {
                assert!(matches!(
                    engine::changed_runs(&v.dir, gone, &v.dir, s.id),
                    Err(EngineError::SnapshotIdNotFound(_))
                ));
            }
        }
    }
}

fn blocks_where(cells: &[Cell], f: impl Fn(&Cell) -> bool) -> BTreeSet<u64> {
    (0..cells.len() as u64)
        .filter(|&i| f(&cells[i as usize]))
        .collect()
}

fn engine_extents(v: Vec<Extent>) -> Vec<(u64, u64)> {
    v.into_iter().map(|e| (e.offset, e.length)).collect()
}

fn to_blocks(extents: &[(u64, u64)]) -> BTreeSet<u64> {
    let bs = u64::from(BS);
    extents
        .iter()
        .flat_map(|&(o, l)| o / bs..(o + l) / bs)
        .collect()
}

/// The maximal runs of `blocks`, in bytes.
fn runs_of(blocks: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let bs = u64::from(BS);
    let mut out: Vec<(u64, u64)> = vec![];
    for &b in blocks {
        match out.last_mut() {
            Some((o, l)) if *o + *l == b * bs => *l += bs,
            _ => out.push((b * bs, bs)),
        }
    }
    out
}

/// All pages of an answer from `start`, checking each page's bound.
fn pages(runs: engine::BlockRuns, start: u64, fixed: bool, max: u32) -> Vec<(u64, u64)> {
    let mut out = vec![];
    for p in Pages::new(runs.starting_at(start), fixed, max) {
        assert!(!p.is_empty());
        assert!(max == 0 || p.len() <= max as usize, "page over max_results");
        out.extend(p.iter().map(|r| (r.offset, r.length)));
    }
    out
}

/// Checks an answer (made afresh by `make` for every reading) against the truth in both
/// styles, from several starting offsets and page sizes, and resumed after an
/// interruption.
fn check_pages(make: impl Fn() -> engine::BlockRuns, truth: &BTreeSet<u64>, seed: u64) {
    let bs = u64::from(BS);
    let whole = runs_of(truth);
    let fixed_whole: Vec<(u64, u64)> = truth.iter().map(|&b| (b * bs, bs)).collect();
    let size = make().size();
    let variable = pages(make(), 0, false, 0);
    assert_eq!(variable, whole, "variable-length answer");
    check_order(&variable);
    assert_eq!(
        pages(make(), 0, true, 3),
        fixed_whole,
        "fixed-length answer"
    );
    // Starting offsets: nothing ends before it, the rest unchanged.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for _ in 0..3 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let start = x % (size + 1);
        let max = (x >> 40) as u32 % 5;
        for fixed in [false, true] {
            let got = pages(make(), start, fixed, max);
            let from = start / bs * bs;
            let want: Vec<(u64, u64)> = if fixed {
                fixed_whole
                    .iter()
                    .copied()
                    .filter(|r| r.0 >= from)
                    .collect()
            } else {
                whole
                    .iter()
                    .filter(|r| r.0 + r.1 > from)
                    .map(|&(o, l)| {
                        if o < from {
                            (from, o + l - from)
                        } else {
                            (o, l)
                        }
                    })
                    .collect()
            };
            assert_eq!(got, want, "from {start}, fixed {fixed}, max {max}");
            assert!(got.iter().all(|r| r.0 + r.1 > start));
        }
    }
    // An interrupted stream resumed from the end of the last range received.
    if let Some(&(o, l)) = whole.get(whole.len() / 2) {
        let mut first: Vec<(u64, u64)> = whole.iter().copied().take_while(|r| r.0 <= o).collect();
        first.extend(pages(make(), o + l, false, 2));
        assert_eq!(first, whole, "resumed answer");
    }
}

fn check_order(r: &[(u64, u64)]) {
    for w in r.windows(2) {
        assert!(
            w[0].0 + w[0].1 < w[1].0,
            "runs not strictly increasing and maximal: {w:?}"
        );
    }
    assert!(r.iter().all(|x| x.1 > 0 && x.1 % u64::from(BS) == 0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn answers_match_the_model(ops in prop::collection::vec(op(), 1..40), seed in any::<u64>()) {
        let mut w = World::new();
        for (i, op) in ops.iter().enumerate() {
            w.apply(op);
            if matches!(op, Op::Snapshot { .. } | Op::Delete { .. } | Op::Restore { .. } | Op::Clone { .. }) || i + 1 == ops.len() {
                w.check(seed ^ i as u64);
            }
        }
    }
}

#[test]
fn a_restore_of_a_restore_answers_against_the_first_volume_after_deletes() {
    let mut w = World::new();
    let write = |w: &mut World, vol: u8, region: u8| {
        w.apply(&Op::Write {
            vol,
            region,
            at: 3,
            len: 4,
        })
    };
    write(&mut w, 0, 0);
    let base = w.snapshot(0);
    write(&mut w, 0, 1);
    w.snapshot(0);
    w.apply(&Op::Restore { vol: 0, which: 1 });
    write(&mut w, 1, 2);
    w.snapshot(1);
    w.apply(&Op::Restore { vol: 1, which: 0 });
    write(&mut w, 2, 0);
    w.snapshot(2);
    // The source snapshots between are deleted: the lineage is kept by the clones.
    w.apply(&Op::Delete { vol: 0, which: 1 });
    w.apply(&Op::Delete { vol: 1, which: 0 });
    w.check(1);
    let t = w.vols[2].snaps[0].id;
    let got: Vec<_> = engine::changed_runs(&w.vols[0].dir, base, &w.vols[2].dir, t)
        .expect("related")
        .map(|e| (e.offset / u64::from(BS), e.length / u64::from(BS)))
        .collect();
    assert_eq!(got, vec![(3, 4), (65_533, 4), (131_069, 4)]);
}
