//! Counters that the layers share: the requests a served device completed (per queue,
//! aggregated when read) and fixed-bucket histograms of durations. No layer below is named
//! here, so the ublk layer can count, the control layer can report and the CSI layer can
//! publish the same figures.
//!
//! Counting costs a few relaxed atomic additions on cache lines owned by one queue thread:
//! no lock and no allocation per request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam::utils::CachePadded;
use serde::{Deserialize, Serialize};

/// Upper bounds of the request latency buckets, in nanoseconds: 16 µs doubling up to
/// about 4.2 s (19 bounds; one more bucket holds the longer ones).
pub const LATENCY_BOUNDS_NS: [u64; 19] = {
    let mut b = [0u64; 19];
    let mut i = 0;
    while i < b.len() {
        b[i] = 16_000 << i;
        i += 1;
    }
    b
};

/// Upper bounds of the freeze window buckets, in nanoseconds: 1 ms doubling up to about
/// 65 s (a freeze is bounded by its deadline, at most 300 s).
pub const FREEZE_BOUNDS_NS: [u64; 17] = {
    let mut b = [0u64; 17];
    let mut i = 0;
    while i < b.len() {
        b[i] = 1_000_000 << i;
        i += 1;
    }
    b
};

/// What a block request asked for, as metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl Direction {
    /// Every direction, in reporting order.
    pub const ALL: [Direction; 5] = [
        Direction::Read,
        Direction::Write,
        Direction::Flush,
        Direction::Discard,
        Direction::WriteZeroes,
    ];

    /// The name used in replies and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
            Direction::Flush => "flush",
            Direction::Discard => "discard",
            Direction::WriteZeroes => "write_zeroes",
        }
    }

    /// The direction named `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Direction> {
        Direction::ALL.into_iter().find(|d| d.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A histogram with fixed bucket bounds, safe to update from any thread.
#[derive(Debug)]
pub struct Histogram {
    bounds_ns: &'static [u64],
    /// One count per bound, then the count above the last bound (not cumulative).
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// An empty histogram with buckets ending at `bounds_ns` (increasing).
    pub fn new(bounds_ns: &'static [u64]) -> Histogram {
        Histogram {
            bounds_ns,
            counts: (0..=bounds_ns.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bounds_ns.partition_point(|&b| b < ns);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The figures as they are now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::empty(self.bounds_ns);
        self.add_to(&mut s);
        s
    }

    /// Adds this histogram's figures to `s` (which has the same bounds).
    fn add_to(&self, s: &mut HistogramSnapshot) {
        for (t, c) in s.counts.iter_mut().zip(self.counts.iter()) {
            *t += c.load(Ordering::Relaxed);
        }
        s.sum_seconds += self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
    }
}

/// A histogram as reported: bucket bounds, the count of each bucket (not cumulative; one
/// more than the bounds, for the values above the last), and the sum of the values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HistogramSnapshot {
    pub bounds_seconds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// An empty histogram with the bounds `bounds_ns`.
    pub fn empty(bounds_ns: &[u64]) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds_seconds: bounds_ns.iter().map(|&b| b as f64 / 1e9).collect(),
            counts: vec![0; bounds_ns.len() + 1],
            sum_seconds: 0.0,
        }
    }

    /// How many values were counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Whether the bounds and counts fit together (a reply from another program may not).
    pub fn is_consistent(&self) -> bool {
        self.counts.len() == self.bounds_seconds.len() + 1
            && self.bounds_seconds.windows(2).all(|w| w[0] < w[1])
            && self.sum_seconds.is_finite()
    }
}

/// The counters of one direction on one queue.
#[derive(Debug)]
struct DirCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
}

impl DirCounters {
    fn new() -> DirCounters {
        DirCounters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            latency: Histogram::new(&LATENCY_BOUNDS_NS),
        }
    }
}

/// The counters of one queue, updated by its thread only.
#[derive(Debug)]
pub struct QueueStats {
    dirs: [DirCounters; Direction::ALL.len()],
}

impl QueueStats {
    fn new() -> QueueStats {
        QueueStats {
            dirs: std::array::from_fn(|_| DirCounters::new()),
        }
    }

    /// Counts one completed request: `bytes` moved (counted only when it succeeded),
    /// whether it failed, and how long it took.
    pub fn record(&self, dir: Direction, bytes: u64, failed: bool, took: Duration) {
        let c = &self.dirs[dir.index()];
        c.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            c.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        c.latency.record(took);
    }

    /// Requests this queue finished, every direction together.
    pub fn requests(&self) -> u64 {
        self.dirs
            .iter()
            .map(|c| c.requests.load(Ordering::Relaxed))
            .sum()
    }
}

/// The request counters of one device: one set per queue, each on cache lines of its own,
/// summed when read.
#[derive(Debug)]
pub struct IoStats {
    queues: Box<[CachePadded<QueueStats>]>,
}

impl IoStats {
    /// Counters for a device of `queues` queues (at least one).
    pub fn new(queues: usize) -> IoStats {
        IoStats {
            queues: (0..queues.max(1))
                .map(|_| CachePadded::new(QueueStats::new()))
                .collect(),
        }
    }

    /// The counters queue `qid` updates.
    pub fn queue(&self, qid: usize) -> &QueueStats {
        &self.queues[qid % self.queues.len()]
    }

    /// The sums over every queue, by direction name.
    pub fn snapshot(&self) -> BTreeMap<String, DirectionSnapshot> {
        Direction::ALL
            .into_iter()
            .map(|d| {
                let mut s = DirectionSnapshot {
                    latency: HistogramSnapshot::empty(&LATENCY_BOUNDS_NS),
                    ..DirectionSnapshot::default()
                };
                for q in self.queues.iter() {
                    let c = &q.dirs[d.index()];
                    s.requests += c.requests.load(Ordering::Relaxed);
                    s.errors += c.errors.load(Ordering::Relaxed);
                    s.bytes += c.bytes.load(Ordering::Relaxed);
                    c.latency.add_to(&mut s.latency);
                }
                (d.name().to_string(), s)
            })
            .collect()
    }
}

/// The requests of one direction since the daemon started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DirectionSnapshot {
    /// Requests completed, failed ones included.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes of the requests that succeeded.
    pub bytes: u64,
    /// From the daemon receiving the request to its answer.
    pub latency: HistogramSnapshot,
}

/// What a volume daemon reports for metrics (the control socket's `stats` reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct VolumeStats {
    /// The engine's id of the volume.
    pub volume_id: String,
    /// Seconds since the daemon started counting (counters restart with the daemon).
    pub uptime_seconds: f64,
    /// The volume's size.
    pub size_bytes: u64,
    /// Bytes of data its layers hold (the space it uses, at most).
    pub stored_bytes: u64,
    /// Snapshots it has now.
    pub snapshots: u64,
    /// Snapshots cut by this daemon.
    pub snapshots_created: u64,
    /// How long file systems stayed frozen, one value per freeze window this daemon held.
    pub freeze: HistogramSnapshot,
    /// Requests by direction name; empty when the daemon serves no device.
    pub io: BTreeMap<String, DirectionSnapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_double_from_16us_to_4s() {
        assert_eq!(LATENCY_BOUNDS_NS[0], 16_000);
        assert_eq!(LATENCY_BOUNDS_NS[18], 16_000 << 18);
        assert!(LATENCY_BOUNDS_NS[18] > 4_000_000_000);
        assert!(LATENCY_BOUNDS_NS.windows(2).all(|w| w[1] == 2 * w[0]));
        assert_eq!(FREEZE_BOUNDS_NS[0], 1_000_000);
        assert!(FREEZE_BOUNDS_NS[16] > 60_000_000_000);
    }

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let h = Histogram::new(&LATENCY_BOUNDS_NS);
        let us = Duration::from_micros;
        // 0 and 16 µs in the first bucket, 16.001 µs and 32 µs in the second, 33 µs in the
        // third, 10 s above every bound.
        for d in [
            Duration::ZERO,
            us(16),
            Duration::from_nanos(16_001),
            us(32),
            us(33),
            Duration::from_secs(10),
        ] {
            h.record(d);
        }
        let s = h.snapshot();
        assert!(s.is_consistent());
        assert_eq!(s.counts.len(), 20);
        assert_eq!(&s.counts[..3], &[2, 2, 1]);
        assert_eq!(s.counts[19], 1);
        assert_eq!(s.count(), 6);
        let want = (16_000 + 16_001 + 32_000 + 33_000) as f64 / 1e9 + 10.0;
        assert!((s.sum_seconds - want).abs() < 1e-9, "{}", s.sum_seconds);
        assert!((s.bounds_seconds[0] - 16e-6).abs() < 1e-15);
    }

    #[test]
    fn queues_are_summed_by_direction() {
        let st = IoStats::new(3);
        st.queue(0)
            .record(Direction::Write, 4096, false, Duration::from_micros(20));
        st.queue(1)
            .record(Direction::Write, 8192, false, Duration::from_micros(40));
        st.queue(2)
            .record(Direction::Write, 4096, true, Duration::from_micros(40));
        // A queue id past the count lands on an existing queue rather than panicking.
        st.queue(7)
            .record(Direction::Read, 512, false, Duration::from_millis(1));
        st.queue(0)
            .record(Direction::Flush, 0, false, Duration::from_micros(5));
        let s = st.snapshot();
        assert_eq!(s.len(), Direction::ALL.len());
        let w = &s["write"];
        assert_eq!((w.requests, w.errors, w.bytes), (3, 1, 12288));
        assert_eq!(w.latency.count(), 3);
        assert_eq!(&w.latency.counts[1..3], &[1, 2]);
        let r = &s["read"];
        assert_eq!((r.requests, r.errors, r.bytes), (1, 0, 512));
        assert_eq!(s["flush"].requests, 1);
        assert_eq!(s["discard"].requests, 0);
        assert_eq!(s["write_zeroes"].latency.count(), 0);
    }

    #[test]
    fn direction_names_round_trip() {
        for d in Direction::ALL {
            assert_eq!(Direction::from_name(d.name()), Some(d));
        }
        assert_eq!(Direction::from_name("trim"), None);
    }

    #[test]
    fn reports_survive_json() {
        let st = IoStats::new(1);
        st.queue(0)
            .record(Direction::Discard, 1 << 20, false, Duration::from_millis(3));
        let freeze = Histogram::new(&FREEZE_BOUNDS_NS);
        freeze.record(Duration::from_millis(12));
        let v = VolumeStats {
            volume_id: "v".into(),
            uptime_seconds: 1.5,
            size_bytes: 1 << 30,
            stored_bytes: 4096,
            snapshots: 2,
            snapshots_created: 1,
            freeze: freeze.snapshot(),
            io: st.snapshot(),
        };
        let back: VolumeStats =
            serde_json::from_str(&serde_json::to_string(&v).expect("json")).expect("parse");
        assert_eq!(back, v);
        assert_eq!(back.freeze.count(), 1);
        assert_eq!(back.freeze.counts[4], 1, "12 ms is in the 16 ms bucket");
        let bad = HistogramSnapshot {
            bounds_seconds: vec![1.0, 0.5],
            counts: vec![0, 0, 0],
            sum_seconds: 0.0,
        };
        assert!(!bad.is_consistent());
    }
}
