//! Prometheus metrics of the CSI processes (served at `--metrics-addr`, see
//! docs/metrics.md): the gRPC calls each process answers, counted by a tower layer, and on
//! a node every served volume's figures, asked from its daemon (`stats` on its control
//! socket) at scrape time. A daemon that does not answer in time is reported down
//! (`snapblk_volume_up 0`) instead of holding the scrape.
//!
//! Encoded as OpenMetrics text with the `prometheus-client` crate.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tower::{Layer, Service};

use super::daemon::Daemons;
use super::ids::VolumeId;
use crate::ctl::client::Client;
use crate::ctl::protocol::Command as CtlCommand;
use crate::stats::{Direction, HistogramSnapshot, VolumeStats};

/// The content type of OpenMetrics text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a scrape waits for one volume daemon's counters.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(2);

/// Most distinct gRPC method paths given a label of their own; others count as `other`,
/// so a client calling made-up methods cannot grow the metrics without bound.
const MAX_METHODS: usize = 128;

/// Labels of an RPC's metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    /// The gRPC service, e.g. `csi.v1.Controller`.
    service: String,
    /// The method, e.g. `CreateVolume`.
    method: String,
    /// The gRPC status code, e.g. `OK`, `NotFound`.
    code: String,
}

type HistogramFamily = Family<RpcLabels, Histogram, fn() -> Histogram>;

fn rpc_histogram() -> Histogram {
    // 1 ms doubling to about 65 s: a CreateVolume answers in milliseconds, a
    // NodeStageVolume that makes a file system may take many seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Counts and times the gRPC calls a CSI process answers, by method and status code.
#[derive(Debug)]
pub struct RpcMetrics {
    requests: Family<RpcLabels, Counter>,
    duration: HistogramFamily,
    methods: Mutex<std::collections::HashSet<String>>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        RpcMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(rpc_histogram as fn() -> Histogram),
            methods: Mutex::default(),
        }
    }
}

impl RpcMetrics {
    /// Counts one call of gRPC path `path` that ended with `code` after `took`.
    pub fn record(&self, path: &str, code: tonic::Code, took: Duration) {
        let (service, method) = self.method_labels(path);
        let labels = RpcLabels {
            service,
            method,
            code: code_name(code).to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// `(service, method)` of a path `/service/method`, bounded in number.
    fn method_labels(&self, path: &str) -> (String, String) {
        let other = || ("other".to_string(), "other".to_string());
        let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
            return other();
        };
        let mut seen = self.methods.lock();
        if !seen.contains(path) {
            if seen.len() >= MAX_METHODS {
                return other();
            }
            seen.insert(path.to_string());
        }
        (service.to_string(), method.to_string())
    }

    fn register(&self, reg: &mut Registry) {
        reg.register(
            "snapblk_csi_rpc_requests",
            "gRPC calls answered, by service, method and status code",
            self.requests.clone(),
        );
        reg.register_with_unit(
            "snapblk_csi_rpc_duration",
            "Time to answer a gRPC call (to the end of its response stream)",
            Unit::Seconds,
            self.duration.clone(),
        );
    }
}

/// The name of a gRPC status code as gRPC tools print it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The `grpc-status` in `headers` (a trailers-only error reply, or the trailers).
fn status_in(headers: &HeaderMap) -> Option<tonic::Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?;
    v.parse::<i32>().ok().map(tonic::Code::from_i32)
}

/// A tower layer that counts every call through [`RpcMetrics`] (or passes calls through
/// untouched when there are none).
#[derive(Debug, Clone, Default)]
pub struct RpcMetricsLayer {
    metrics: Option<Arc<RpcMetrics>>,
}

impl RpcMetricsLayer {
    /// A layer counting into `metrics`, if any.
    pub fn new(metrics: Option<Arc<RpcMetrics>>) -> RpcMetricsLayer {
        RpcMetricsLayer { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// A gRPC service whose calls are counted.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Option<Arc<RpcMetrics>>,
}

/// One call being timed; recorded once, when its status is known.
#[derive(Debug)]
struct Probe {
    metrics: Arc<RpcMetrics>,
    path: String,
    start: Instant,
}

impl Probe {
    fn done(self, code: tonic::Code) {
        self.metrics.record(&self.path, code, self.start.elapsed());
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Metered<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let probe = self.metrics.clone().map(|metrics| Probe {
            metrics,
            path: req.uri().path().to_string(),
            start: Instant::now(),
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let mut probe = probe;
                    // An error is usually answered in the headers alone.
                    if let Some(code) = status_in(&parts.headers) {
                        if let Some(p) = probe.take() {
                            p.done(code);
                        }
                    }
                    Ok(http::Response::from_parts(
                        parts,
                        MeteredBody { inner: body, probe },
                    ))
                }
                Err(e) => {
                    if let Some(p) = probe {
                        p.done(tonic::Code::Unknown);
                    }
                    Err(e)
                }
            }
        })
    }
}

/// A response body that records its call when the status arrives in the trailers, or as
/// cancelled when it is dropped before.
#[derive(Debug)]
pub struct MeteredBody<B> {
    inner: B,
    probe: Option<Probe>,
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(p) = self.probe.take() {
            p.done(tonic::Code::Cancelled);
        }
    }
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| status_in(t).unwrap_or(tonic::Code::Unknown)),
            Poll::Ready(Some(Err(_))) => Some(tonic::Code::Unknown),
            // The end of a body without trailers carries no status.
            Poll::Ready(None) => Some(tonic::Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = code {
            if let Some(p) = this.probe.take() {
                p.done(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where a node plugin finds what its volume metrics are made of.
pub struct NodeMetrics {
    /// This node's id, the first part of its volumes' CSI ids.
    pub node_id: String,
    pub daemons: Arc<Daemons>,
    /// The folder holding the node's volumes (for its free space).
    pub volumes_dir: PathBuf,
}

/// One served volume at scrape time.
#[derive(Debug, Clone)]
pub struct VolumeSample {
    /// The CSI volume id.
    pub volume_id: String,
    /// The daemon's counters, or why there are none.
    pub stats: Result<VolumeStats, String>,
}

/// A node's figures at scrape time.
#[derive(Debug, Clone, Default)]
pub struct NodeSample {
    pub volumes: Vec<VolumeSample>,
    /// Size and free bytes of the file system holding the volumes.
    pub space: Option<(u64, u64)>,
}

/// Asks the daemon at `socket` for its counters, waiting at most `timeout` for each step.
pub fn query_stats(socket: &Path, timeout: Duration) -> Result<VolumeStats, String> {
    let mut c = Client::connect_with_timeout(socket, timeout).map_err(|e| e.message)?;
    let v = c.call(CtlCommand::Stats).map_err(|e| e.message)?;
    let stats: VolumeStats = serde_json::from_value(v)
        .map_err(|e| format!("the daemon's stats reply is not understood: {e}"))?;
    let bad = std::iter::once(&stats.freeze)
        .chain(stats.io.values().map(|d| &d.latency))
        .any(|h| !h.is_consistent());
    if bad {
        return Err("the daemon's stats reply has malformed histograms".into());
    }
    Ok(stats)
}

impl NodeMetrics {
    /// Asks every served volume's daemon for its counters, all at once, each within
    /// [`DAEMON_TIMEOUT`].
    pub async fn sample(&self) -> NodeSample {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, s) in self.daemons.all().into_iter().enumerate() {
            let volume_id = VolumeId {
                node: self.node_id.clone(),
                key: s.key.clone(),
            }
            .to_string();
            tasks.spawn(async move {
                let ask =
                    tokio::task::spawn_blocking(move || query_stats(&s.socket, DAEMON_TIMEOUT));
                let stats = match tokio::time::timeout(DAEMON_TIMEOUT * 2, ask).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(format!("asking the daemon failed: {e}")),
                    Err(_) => Err("the daemon did not answer in time".into()),
                };
                (i, VolumeSample { volume_id, stats })
            });
        }
        let mut volumes = vec![];
        while let Some(done) = tasks.join_next().await {
            if let Ok(v) = done {
                volumes.push(v);
            }
        }
        volumes.sort_by(|a, b| a.1.volume_id.cmp(&b.1.volume_id).then(a.0.cmp(&b.0)));
        for (_, v) in &volumes {
            if let Err(why) = &v.stats {
                tracing::debug!(volume = %v.volume_id, why, "no metrics from the volume daemon");
            }
        }
        let dir = self.volumes_dir.clone();
        let space = tokio::task::spawn_blocking(move || {
            let st = nix::sys::statvfs::statvfs(&dir).ok()?;
            let frag = st.fragment_size();
            Some((
                st.blocks().saturating_mul(frag),
                st.blocks_available().saturating_mul(frag),
            ))
        })
        .await
        .ok()
        .flatten();
        NodeSample {
            volumes: volumes.into_iter().map(|(_, v)| v).collect(),
            space,
        }
    }
}

/// Reads one counter of a direction's figures.
type CounterOf = fn(&crate::stats::DirectionSnapshot) -> u64;

/// Encodes a node's sample as metric families.
#[derive(Debug)]
struct NodeCollector(NodeSample);

/// The buckets of `h` as the encoder takes them: (upper bound, count), the last one +Inf.
fn buckets(h: &HistogramSnapshot) -> Vec<(f64, u64)> {
    h.bounds_seconds
        .iter()
        .copied()
        .chain(std::iter::once(f64::INFINITY))
        .zip(h.counts.iter().copied())
        .collect()
}

impl NodeCollector {
    /// The volumes whose daemon answered, with their counters.
    fn answered(&self) -> impl Iterator<Item = (&str, &VolumeStats)> {
        self.0
            .volumes
            .iter()
            .filter_map(|v| v.stats.as_ref().ok().map(|s| (v.volume_id.as_str(), s)))
    }

    /// One family with one value per answering volume.
    fn per_volume<M: EncodeMetric>(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&VolumeStats) -> M,
    ) -> Result<(), std::fmt::Error> {
        let Some((_, first)) = self.answered().next() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(name, help, unit, value(first).metric_type())?;
        for (id, s) in self.answered() {
            let labels = [("volume_id", id)];
            value(s).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// The request families: counts, errors, bytes and latency, by volume and direction.
    fn io_families(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.answered().all(|(_, s)| s.io.is_empty()) {
            return Ok(());
        }
        // Only the known directions: a daemon cannot add labels.
        let rows = || {
            self.answered().flat_map(|(id, s)| {
                Direction::ALL
                    .into_iter()
                    .filter_map(move |d| s.io.get(d.name()).map(|x| (id, d, x)))
            })
        };
        let counters: [(&str, &str, CounterOf, bool); 3] = [
            (
                "snapblk_volume_io_requests",
                "Block requests the volume's device finished, failed ones included",
                |x| x.requests,
                true,
            ),
            (
                "snapblk_volume_io_errors",
                "Block requests the volume's device failed",
                |x| x.errors,
                true,
            ),
            (
                "snapblk_volume_io",
                "Bytes of the block requests that succeeded (no flush: it moves none)",
                |x| x.bytes,
                false,
            ),
        ];
        for (name, help, value, with_flush) in counters {
            let unit = (!with_flush).then_some(Unit::Bytes);
            let mut fam = e.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
            for (id, d, x) in rows() {
                if d == Direction::Flush && !with_flush {
                    continue;
                }
                let labels = [("volume_id", id), ("direction", d.name())];
                ConstCounter::new(value(x)).encode(fam.encode_family(&labels)?)?;
            }
        }
        let mut fam = e.encode_descriptor(
            "snapblk_volume_io_duration",
            "Time from the daemon receiving a block request to its answer",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (id, d, x) in rows() {
            let labels = [("volume_id", id), ("direction", d.name())];
            fam.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                x.latency.sum_seconds,
                x.latency.count(),
                &buckets(&x.latency),
                None,
            )?;
        }
        Ok(())
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        if !self.0.volumes.is_empty() {
            let mut up = e.encode_descriptor(
                "snapblk_volume_up",
                "1 when the volume's daemon answered this scrape, 0 when it did not",
                None,
                MetricType::Gauge,
            )?;
            for v in &self.0.volumes {
                let labels = [("volume_id", v.volume_id.as_str())];
                ConstGauge::new(i64::from(v.stats.is_ok())).encode(up.encode_family(&labels)?)?;
            }
        }
        self.per_volume(
            e,
            "snapblk_volume_size",
            "The volume's size",
            Some(&Unit::Bytes),
            |s| ConstGauge::new(s.size_bytes),
        )?;
        self.per_volume(
            e,
            "snapblk_volume_stored",
            "Bytes of data the volume's layers hold (the space it uses, at most)",
            Some(&Unit::Bytes),
            |s| ConstGauge::new(s.stored_bytes),
        )?;
        self.per_volume(
            e,
            "snapblk_volume_snapshots",
            "Snapshots the volume has",
            None,
            |s| ConstGauge::new(s.snapshots),
        )?;
        self.per_volume(
            e,
            "snapblk_volume_snapshots_created",
            "Snapshots cut by the volume's daemon since it started",
            None,
            |s| ConstCounter::new(s.snapshots_created),
        )?;
        self.per_volume(
            e,
            "snapblk_volume_daemon_uptime",
            "Time since the volume's daemon started counting (its counters restart with it)",
            Some(&Unit::Seconds),
            |s| ConstGauge::new(s.uptime_seconds),
        )?;
        if self.answered().next().is_some() {
            let mut fam = e.encode_descriptor(
                "snapblk_volume_freeze_duration",
                "How long the volume's file systems stayed frozen, one value per freeze window",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (id, s) in self.answered() {
                let labels = [("volume_id", id)];
                fam.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    s.freeze.sum_seconds,
                    s.freeze.count(),
                    &buckets(&s.freeze),
                    None,
                )?;
            }
        }
        self.io_families(e)?;
        if !self.0.volumes.is_empty() || self.0.space.is_some() {
            let served = e.encode_descriptor(
                "snapblk_node_volumes_served",
                "Volumes the node plugin serves (staged), answering or not",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(self.0.volumes.len() as u64).encode(served)?;
        }
        if let Some((size, free)) = self.0.space {
            for (name, help, v) in [
                (
                    "snapblk_node_capacity",
                    "Size of the file system holding the node's volumes",
                    size,
                ),
                (
                    "snapblk_node_free",
                    "Free space of the file system holding the node's volumes",
                    free,
                ),
            ] {
                let m = ConstGauge::new(v);
                m.encode(e.encode_descriptor(name, help, Some(&Unit::Bytes), m.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// What a process's metrics endpoint reports: its gRPC calls, and on a node its volumes.
#[derive(Default)]
pub struct MetricsSources {
    pub rpc: Option<Arc<RpcMetrics>>,
    pub node: Option<NodeMetrics>,
}

impl MetricsSources {
    /// The metrics as they are now, in OpenMetrics text.
    pub async fn render(&self) -> Result<String, std::fmt::Error> {
        let sample = match &self.node {
            Some(n) => Some(n.sample().await),
            None => None,
        };
        encode(self.rpc.as_deref(), sample)
    }
}

/// Encodes the RPC counters and a node's sample in OpenMetrics text.
pub fn encode(
    rpc: Option<&RpcMetrics>,
    node: Option<NodeSample>,
) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::default();
    if let Some(r) = rpc {
        r.register(&mut reg);
    }
    if let Some(n) = node {
        reg.register_collector(Box::new(NodeCollector(n)));
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::daemon::{Layout, Served};
    use crate::ctl::server::{Access, Limits, Server};
    use crate::ctl::service::{DeviceInfo, VolumeService};
    use crate::engine::{CreateOptions, Volume};
    use crate::stats::IoStats;

    /// The value of the sample line `name{labels}` in `text`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.split(' ').next()?.parse().ok())
    }

    fn stats_with_writes(writes: u64) -> VolumeStats {
        let io = IoStats::new(2);
        for i in 0..writes {
            io.queue(i as usize)
                .record(Direction::Write, 4096, false, Duration::from_micros(100));
        }
        io.queue(0)
            .record(Direction::Read, 8192, true, Duration::from_millis(2));
        VolumeStats {
            volume_id: "engine-id".into(),
            uptime_seconds: 3.0,
            size_bytes: 1 << 30,
            stored_bytes: writes * 4096,
            snapshots: 2,
            snapshots_created: 1,
            freeze: HistogramSnapshot::empty(&crate::stats::FREEZE_BOUNDS_NS),
            io: io.snapshot(),
        }
    }

    #[test]
    fn node_sample_encodes_every_family() {
        let sample = NodeSample {
            volumes: vec![
                VolumeSample {
                    volume_id: "n1/a".into(),
                    stats: Ok(stats_with_writes(3)),
                },
                VolumeSample {
                    volume_id: "n1/b".into(),
                    stats: Err("hung".into()),
                },
            ],
            space: Some((100 << 30, 40 << 30)),
        };
        let rpc = RpcMetrics::default();
        rpc.record(
            "/csi.v1.Controller/CreateVolume",
            tonic::Code::Ok,
            Duration::from_millis(3),
        );
        rpc.record(
            "/csi.v1.Controller/CreateVolume",
            tonic::Code::Ok,
            Duration::from_millis(5),
        );
        rpc.record(
            "/csi.v1.Controller/DeleteVolume",
            tonic::Code::NotFound,
            Duration::from_millis(1),
        );
        let text = encode(Some(&rpc), Some(sample)).expect("encode");
        assert!(text.ends_with("# EOF\n"), "{text}");
        let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
        assert_eq!(v(r#"snapblk_volume_up{volume_id="n1/a"}"#), 1.0);
        assert_eq!(v(r#"snapblk_volume_up{volume_id="n1/b"}"#), 0.0);
        assert_eq!(
            v(r#"snapblk_volume_io_requests_total{volume_id="n1/a",direction="write"}"#),
            3.0
        );
        assert_eq!(
            v(r#"snapblk_volume_io_bytes_total{volume_id="n1/a",direction="write"}"#),
            12288.0
        );
        assert_eq!(
            v(r#"snapblk_volume_io_errors_total{volume_id="n1/a",direction="read"}"#),
            1.0
        );
        assert_eq!(
            v(r#"snapblk_volume_io_bytes_total{volume_id="n1/a",direction="read"}"#),
            0.0
        );
        // Cumulative buckets: 100 us is in le=0.000128, and so in every bucket above.
        assert_eq!(
            v(
                r#"snapblk_volume_io_duration_seconds_bucket{le="0.000064",volume_id="n1/a",direction="write"}"#
            ),
            0.0
        );
        assert_eq!(
            v(
                r#"snapblk_volume_io_duration_seconds_bucket{le="0.000128",volume_id="n1/a",direction="write"}"#
            ),
            3.0
        );
        assert_eq!(
            v(
                r#"snapblk_volume_io_duration_seconds_bucket{le="+Inf",volume_id="n1/a",direction="write"}"#
            ),
            3.0
        );
        assert_eq!(
            v(r#"snapblk_volume_io_duration_seconds_count{volume_id="n1/a",direction="write"}"#),
            3.0
        );
        assert!(
            (v(r#"snapblk_volume_io_duration_seconds_sum{volume_id="n1/a",direction="write"}"#)
                - 0.0003)
                .abs()
                < 1e-9
        );
        assert_eq!(v(r#"snapblk_volume_snapshots{volume_id="n1/a"}"#), 2.0);
        assert_eq!(
            v(r#"snapblk_volume_snapshots_created_total{volume_id="n1/a"}"#),
            1.0
        );
        assert_eq!(
            v(r#"snapblk_volume_stored_bytes{volume_id="n1/a"}"#),
            12288.0
        );
        assert_eq!(
            v(r#"snapblk_volume_size_bytes{volume_id="n1/a"}"#),
            1073741824.0
        );
        assert_eq!(
            v(r#"snapblk_volume_freeze_duration_seconds_count{volume_id="n1/a"}"#),
            0.0
        );
        assert_eq!(v("snapblk_node_volumes_served"), 2.0);
        assert_eq!(v("snapblk_node_free_bytes"), (40u64 << 30) as f64);
        assert_eq!(v("snapblk_node_capacity_bytes"), (100u64 << 30) as f64);
        // The volume that did not answer has nothing but its up gauge.
        assert!(!text.contains(r#"snapblk_volume_snapshots{volume_id="n1/b"}"#));
        // No flush bytes: a flush moves none.
        assert!(
            !text.contains(r#"snapblk_volume_io_bytes_total{volume_id="n1/a",direction="flush"}"#)
        );
        assert_eq!(
            v(
                r#"snapblk_csi_rpc_requests_total{service="csi.v1.Controller",method="CreateVolume",code="OK"}"#
            ),
            2.0
        );
        assert_eq!(
            v(
                r#"snapblk_csi_rpc_duration_seconds_count{service="csi.v1.Controller",method="DeleteVolume",code="NotFound"}"#
            ),
            1.0
        );
        for family in [
            "# TYPE snapblk_volume_io_duration_seconds histogram",
            "# TYPE snapblk_volume_io_requests counter",
            "# TYPE snapblk_volume_up gauge",
            "# UNIT snapblk_volume_io_duration_seconds seconds",
            "# TYPE snapblk_csi_rpc_duration_seconds histogram",
        ] {
            assert!(text.contains(family), "{family} missing in\n{text}");
        }
    }

    #[test]
    fn method_labels_are_bounded() {
        let rpc = RpcMetrics::default();
        for i in 0..(MAX_METHODS + 10) {
            rpc.record(
                &format!("/x.Y/M{i}"),
                tonic::Code::Unimplemented,
                Duration::ZERO,
            );
        }
        rpc.record("nonsense", tonic::Code::Unimplemented, Duration::ZERO);
        let text = encode(Some(&rpc), None).expect("encode");
        let series = text
            .lines()
            .filter(|l| l.starts_with("snapblk_csi_rpc_requests_total{"))
            .count();
        assert_eq!(series, MAX_METHODS + 1, "{text}");
        assert_eq!(
            value(
                &text,
                r#"snapblk_csi_rpc_requests_total{service="other",method="other",code="Unimplemented"}"#
            ),
            Some(11.0)
        );
        // A path seen before the limit keeps its label.
        rpc.record("/x.Y/M0", tonic::Code::Ok, Duration::ZERO);
        let text = encode(Some(&rpc), None).expect("encode");
        assert_eq!(
            value(
                &text,
                r#"snapblk_csi_rpc_requests_total{service="x.Y",method="M0",code="OK"}"#
            ),
            Some(1.0)
        );
    }

    /// A daemon that answers, one that accepts but never answers, and one that is gone:
    /// the scrape takes about one daemon timeout, and only the first is up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_or_dead_daemon_is_down_and_does_not_hold_the_scrape() {
        let tmp = tempfile::tempdir().expect("tmp");
        let layout = Layout::new(tmp.path());
        layout.create().expect("layout");
        let vol = Volume::create(
            &layout.volumes.join("good"),
            &CreateOptions {
                size: 1 << 20,
                block_size: 4096,
            },
        )
        .expect("volume");
        vol.write(0, &[5u8; 4096], false).expect("write");
        let io = Arc::new(IoStats::new(1));
        io.queue(0)
            .record(Direction::Write, 4096, false, Duration::from_micros(30));
        let device = DeviceInfo {
            path: "/dev/ublkb901".into(),
            major: 259,
            minor: 901,
            mode: "copy".into(),
        };
        let svc = Arc::new(VolumeService::new(vol, Some(device), None, None).with_io_stats(io));
        let good_sock = layout.sockets.join("good.sock");
        let _server =
            Server::start(&good_sock, Access::default(), Limits::default(), svc).expect("server");
        // Accepts connections (the kernel's backlog) and never reads or answers.
        let hung_sock = layout.sockets.join("hung.sock");
        let _hung = std::os::unix::net::UnixListener::bind(&hung_sock).expect("bind");
        let gone_sock = layout.sockets.join("gone.sock");
        let daemons = Arc::new(Daemons::new(PathBuf::from("/nonexistent"), layout.clone()));
        for (key, socket, dev_id) in [
            ("good", &good_sock, 901),
            ("hung", &hung_sock, 902),
            ("gone", &gone_sock, 903),
        ] {
            daemons.track(Served {
                key: key.into(),
                pid: 1,
                device: format!("/dev/ublkb{dev_id}"),
                dev_id,
                socket: socket.clone(),
                staging_path: "/staging".into(),
                block: true,
            });
        }
        let m = NodeMetrics {
            node_id: "n1".into(),
            daemons,
            volumes_dir: layout.volumes.clone(),
        };
        let t0 = Instant::now();
        let sample = m.sample().await;
        let took = t0.elapsed();
        assert!(took < DAEMON_TIMEOUT * 2, "the scrape took {took:?}");
        let ids: Vec<&str> = sample
            .volumes
            .iter()
            .map(|v| v.volume_id.as_str())
            .collect();
        assert_eq!(ids, ["n1/gone", "n1/good", "n1/hung"]);
        let st = sample.volumes[1]
            .stats
            .as_ref()
            .expect("the good daemon answers");
        assert_eq!(st.io["write"].requests, 1);
        assert_eq!(st.stored_bytes, 4096);
        assert!(sample.volumes[0].stats.is_err());
        assert!(sample.volumes[2].stats.is_err());
        assert!(sample
            .space
            .is_some_and(|(size, free)| size >= free && size > 0));
        let text = encode(None, Some(sample)).expect("encode");
        assert_eq!(
            value(&text, r#"snapblk_volume_up{volume_id="n1/hung"}"#),
            Some(0.0)
        );
        assert_eq!(
            value(&text, r#"snapblk_volume_up{volume_id="n1/good"}"#),
            Some(1.0)
        );
    }
}
