//! The node side of the controller-to-node contract: the NodeAgent service, which does on
//! this node what the controller decided, and the heartbeat that tells the controller
//! where to find it.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::Token;
use super::proto::node as pb;
use super::proto::node::registry_client::RegistryClient;
use super::registry::HEARTBEAT_INTERVAL;
use super::status;
use super::store::Store;
use crate::engine::{BlockRuns, Extent};

/// Ranges per page when the caller does not say.
pub const DEFAULT_PAGE: usize = 1024;
/// Most ranges per page, whatever the caller asks: pages stay far below gRPC's message
/// limit, and memory stays bounded by a few pages in flight.
pub const MAX_PAGE: usize = 16384;
/// Pages computed ahead of the network.
const PAGES_AHEAD: usize = 2;

/// Why this node cannot serve ublk devices right now, if it cannot.
pub fn ublk_unready() -> Option<String> {
    let ctl = std::path::Path::new("/dev/ublk-control");
    if !ctl.exists() {
        return Some(
            "the ublk driver is not loaded (/dev/ublk-control is missing): run `modprobe ublk_drv` on the node (Linux 6.0 or newer, CONFIG_BLK_DEV_UBLK)".into(),
        );
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(ctl) {
        return Some(format!(
            "cannot open /dev/ublk-control: {e} (the node plugin must run privileged, as root)"
        ));
    }
    None
}

/// The NodeAgent service of one node.
pub struct Agent {
    pub node_id: String,
    pub store: Arc<Store>,
}

impl Agent {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(status::join)?
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl pb::node_agent_server::NodeAgent for Agent {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let node_id = self.node_id.clone();
        self.run(move |s| {
            let reason = ublk_unready();
            Ok(pb::InfoResponse {
                node_id,
                version: env!("CARGO_PKG_VERSION").to_string(),
                capacity: Some(s.capacity()?),
                ready: reason.is_none(),
                reason: reason.unwrap_or_default(),
            })
        })
        .await
    }

    #[tracing::instrument(skip_all, err, fields(name = %req.get_ref().name))]
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        self.run(move |s| {
            Ok(pb::CreateVolumeResponse {
                volume: Some(s.create(&r)?),
            })
        })
        .await
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().key))]
    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        self.run(move |s| s.delete(&r.key).map(|()| pb::DeleteVolumeResponse {}))
            .await
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().key))]
    async fn expand_volume(
        &self,
        req: Request<pb::ExpandVolumeRequest>,
    ) -> Result<Response<pb::ExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        self.run(move |s| {
            let (capacity_bytes, staged) = s.expand(&r.key, r.capacity_bytes)?;
            Ok(pb::ExpandVolumeResponse {
                capacity_bytes,
                staged,
            })
        })
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        self.run(move |s| {
            Ok(pb::ListVolumesResponse {
                volumes: s.volumes(&r.name),
            })
        })
        .await
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_key, name = %req.get_ref().name))]
    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        self.run(move |s| {
            Ok(pb::CreateSnapshotResponse {
                snapshot: Some(s.snapshot(&r)?),
            })
        })
        .await
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_key, id = req.get_ref().id))]
    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        self.run(move |s| {
            s.delete_snapshot(&r.volume_key, r.id)
                .map(|()| pb::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        self.run(move |s| {
            Ok(pb::ListSnapshotsResponse {
                snapshots: s.snapshots(&r),
            })
        })
        .await
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_key, reason = %req.get_ref().reason))]
    async fn freeze_volume(
        &self,
        req: Request<pb::FreezeVolumeRequest>,
    ) -> Result<Response<pb::FreezeVolumeResponse>, Status> {
        let r = req.into_inner();
        let max = crate::ctl::protocol::MAX_FREEZE_TIMEOUT;
        let timeout = Duration::from_millis(r.timeout_ms);
        if timeout.is_zero() || timeout > max {
            return Err(Status::invalid_argument(format!(
                "timeout_ms {} is out of range: 1 ms to {} s",
                r.timeout_ms,
                max.as_secs()
            )));
        }
        let (key, reason) = (r.volume_key, r.reason);
        let answer = self.run(move |s| s.freeze(&key, timeout, &reason)).await?;
        let handle = answer.get_ref().handle.clone();
        if !handle.is_empty() {
            // The window is bounded here too: at the deadline the connection to the
            // daemon closes, which thaws, whether or not the controller is still there.
            let store = self.store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                let _ = tokio::task::spawn_blocking(move || store.expire(&handle)).await;
            });
        }
        Ok(answer)
    }

    #[tracing::instrument(skip_all, err)]
    async fn thaw_volume(
        &self,
        req: Request<pb::ThawVolumeRequest>,
    ) -> Result<Response<pb::ThawVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.handle.is_empty() {
            return Err(status::missing("handle"));
        }
        self.run(move |s| s.thaw(&r.handle)).await
    }

    type GetAllocatedStream = ReceiverStream<Result<pb::BlockRanges, Status>>;

    #[tracing::instrument(skip_all, err, fields(volume = ?req.get_ref().snapshot.as_ref().map(|s| &s.volume_key)))]
    async fn get_allocated(
        &self,
        req: Request<pb::GetAllocatedRequest>,
    ) -> Result<Response<Self::GetAllocatedStream>, Status> {
        let r = req.into_inner();
        let snap = r.snapshot.ok_or_else(|| status::missing("snapshot"))?;
        let runs = self
            .run(move |s| s.allocated_runs(&snap.volume_key, snap.snapshot_id))
            .await?
            .into_inner();
        stream_pages(runs, r.starting_offset, r.style, r.max_results).map(Response::new)
    }

    type GetDeltaStream = ReceiverStream<Result<pb::BlockRanges, Status>>;

    #[tracing::instrument(skip_all, err, fields(volume = ?req.get_ref().target.as_ref().map(|s| &s.volume_key)))]
    async fn get_delta(
        &self,
        req: Request<pb::GetDeltaRequest>,
    ) -> Result<Response<Self::GetDeltaStream>, Status> {
        let r = req.into_inner();
        let base = r.base.ok_or_else(|| status::missing("base"))?;
        let target = r.target.ok_or_else(|| status::missing("target"))?;
        let runs = self
            .run(move |s| s.changed_runs(&base, &target))
            .await?
            .into_inner();
        stream_pages(runs, r.starting_offset, r.style, r.max_results).map(Response::new)
    }
}

/// The ranges of an answer cut into pages of at most `max` ranges, each range maximal
/// (variable style) or one block long (fixed style).
pub struct Pages {
    runs: BlockRuns,
    fixed: bool,
    max: usize,
    /// The rest of a run cut into blocks that did not fit the previous page.
    carry: Option<Extent>,
}

impl Pages {
    /// Pages of `runs`; `max_results` 0 takes [`DEFAULT_PAGE`], and at most [`MAX_PAGE`].
    pub fn new(runs: BlockRuns, fixed: bool, max_results: u32) -> Pages {
        let max = match max_results as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        Pages {
            runs,
            fixed,
            max,
            carry: None,
        }
    }
}

impl Iterator for Pages {
    type Item = Vec<pb::BlockRange>;

    fn next(&mut self) -> Option<Vec<pb::BlockRange>> {
        let bs = u64::from(self.runs.block_size());
        let mut page = Vec::with_capacity(self.max.min(DEFAULT_PAGE));
        while page.len() < self.max {
            let Some(e) = self.carry.take().or_else(|| self.runs.next()) else {
                break;
            };
            if self.fixed && e.length > bs {
                self.carry = Some(Extent {
                    offset: e.offset + bs,
                    length: e.length - bs,
                });
            }
            page.push(pb::BlockRange {
                offset: e.offset,
                length: if self.fixed { bs } else { e.length },
            });
        }
        (!page.is_empty()).then_some(page)
    }
}

/// Streams the pages of `runs` from `starting_offset`, computed on a blocking thread a
/// few pages ahead of the receiver; stops when the receiver goes away.
fn stream_pages(
    runs: BlockRuns,
    starting_offset: u64,
    style: i32,
    max_results: u32,
) -> Result<ReceiverStream<Result<pb::BlockRanges, Status>>, Status> {
    let size = runs.size();
    if starting_offset > size {
        return Err(Status::out_of_range(format!(
            "starting_offset {starting_offset} is past the end of the snapshot ({size} bytes)"
        )));
    }
    let block_size = runs.block_size();
    let fixed = style == pb::RangeStyle::RangeFixed as i32;
    let pages = Pages::new(runs.starting_at(starting_offset), fixed, max_results);
    let (tx, rx) = tokio::sync::mpsc::channel(PAGES_AHEAD);
    tokio::task::spawn_blocking(move || {
        for ranges in pages {
            let page = pb::BlockRanges {
                size_bytes: size,
                block_size,
                ranges,
            };
            if tx.blocking_send(Ok(page)).is_err() {
                return;
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Sends heartbeats to the controller at `controller` forever, so it knows this node is
/// alive at `agent_address`. Failures are logged (once per change) and retried.
pub async fn heartbeat(controller: String, node_id: String, agent_address: String, token: Token) {
    let mut interval = HEARTBEAT_INTERVAL;
    let mut failing = false;
    let endpoint = match tonic::transport::Endpoint::from_shared(controller.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10)),
        Err(e) => {
            tracing::error!(controller, error = %e, "the controller address is not a valid URI: this node will not be registered");
            return;
        }
    };
    let mut client = RegistryClient::with_interceptor(endpoint.connect_lazy(), token.bearer());
    loop {
        let req = pb::HeartbeatRequest {
            node_id: node_id.clone(),
            agent_address: agent_address.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        match client.heartbeat(req).await {
            Ok(r) => {
                if failing {
                    tracing::info!(controller, "the controller answers heartbeats again");
                }
                failing = false;
                let ms = r.into_inner().interval_ms;
                interval = Duration::from_millis(ms.clamp(1000, 60_000));
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(controller, error = %e.message(), code = ?e.code(), "heartbeat to the controller failed; retrying");
                }
                failing = true;
            }
        }
        tokio::time::sleep(if failing {
            Duration::from_secs(2)
        } else {
            interval
        })
        .await;
    }
}
