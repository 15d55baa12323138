//! The CSI SnapshotMetadata service (changed-block tracking for backup tools): the
//! allocated ranges of a snapshot and the ranges changed between two snapshots, streamed
//! in pages. Served by the controller, which forwards each call to the node that owns the
//! snapshot (NodeAgent GetAllocated / GetDelta) and relays the node's pages as they come:
//! the answers come from the layers' maps on that node, never from reading data, and no
//! process holds more than a few pages of an answer.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::controller::relay;
use super::ids::SnapshotId;
use super::proto::csi;
use super::proto::node as pb;
use super::registry::Registry;
use super::status;

/// How ranges are cut in the answers (the spec leaves it to the driver; no request field
/// chooses it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MetadataStyle {
    /// VARIABLE_LENGTH: maximal runs of consecutive blocks (fewest ranges).
    #[default]
    Variable,
    /// FIXED_LENGTH: one range per block of the volume (its block size).
    Fixed,
}

impl MetadataStyle {
    fn csi(self) -> csi::BlockMetadataType {
        match self {
            MetadataStyle::Variable => csi::BlockMetadataType::VariableLength,
            MetadataStyle::Fixed => csi::BlockMetadataType::FixedLength,
        }
    }

    fn node(self) -> pb::RangeStyle {
        match self {
            MetadataStyle::Variable => pb::RangeStyle::RangeVariable,
            MetadataStyle::Fixed => pb::RangeStyle::RangeFixed,
        }
    }
}

/// The SnapshotMetadata service.
pub struct SnapshotMetadata {
    pub registry: Arc<Registry>,
    pub style: MetadataStyle,
}

type Pages<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn snapshot_ref(field: &str, id: &str) -> Result<SnapshotId, Status> {
    if id.is_empty() {
        return Err(status::missing(field));
    }
    SnapshotId::parse(id).map_err(|e| Status::not_found(format!("{field}: {e}")))
}

fn node_ref(id: &SnapshotId) -> pb::SnapshotRef {
    pb::SnapshotRef {
        volume_key: id.volume.key.clone(),
        snapshot_id: id.id,
    }
}

/// Checks `starting_offset` and `max_results`.
fn bounds(starting_offset: i64, max_results: i32) -> Result<(u64, u32), Status> {
    if starting_offset < 0 {
        return Err(Status::out_of_range(format!(
            "starting_offset {starting_offset} is negative"
        )));
    }
    if max_results < 0 {
        return Err(Status::invalid_argument(format!(
            "max_results {max_results} is negative"
        )));
    }
    Ok((starting_offset as u64, max_results as u32))
}

fn ranges(p: &pb::BlockRanges) -> Vec<csi::BlockMetadata> {
    p.ranges
        .iter()
        .map(|r| csi::BlockMetadata {
            byte_offset: r.offset as i64,
            size_bytes: r.length as i64,
        })
        .collect()
}

#[tonic::async_trait]
impl csi::snapshot_metadata_server::SnapshotMetadata for SnapshotMetadata {
    type GetMetadataAllocatedStream = Pages<csi::GetMetadataAllocatedResponse>;

    #[tracing::instrument(skip_all, err, fields(snapshot = %req.get_ref().snapshot_id))]
    async fn get_metadata_allocated(
        &self,
        req: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = req.into_inner();
        let id = snapshot_ref("snapshot_id", &r.snapshot_id)?;
        let (starting_offset, max_results) = bounds(r.starting_offset, r.max_results)?;
        let node = id.volume.node.clone();
        let mut client = self.registry.client(&node)?;
        let pages = client
            .get_allocated(pb::GetAllocatedRequest {
                snapshot: Some(node_ref(&id)),
                starting_offset,
                max_results,
                style: self.style.node() as i32,
            })
            .await
            .map_err(|e| relay(&node, e))?
            .into_inner();
        let kind = self.style.csi() as i32;
        let out = pages.map(move |p| {
            let p = p.map_err(|e| relay(&node, e))?;
            Ok(csi::GetMetadataAllocatedResponse {
                block_metadata_type: kind,
                volume_capacity_bytes: p.size_bytes as i64,
                block_metadata: ranges(&p),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    type GetMetadataDeltaStream = Pages<csi::GetMetadataDeltaResponse>;

    #[tracing::instrument(skip_all, err, fields(base = %req.get_ref().base_snapshot_id, target = %req.get_ref().target_snapshot_id))]
    async fn get_metadata_delta(
        &self,
        req: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = req.into_inner();
        let base = snapshot_ref("base_snapshot_id", &r.base_snapshot_id)?;
        let target = snapshot_ref("target_snapshot_id", &r.target_snapshot_id)?;
        let (starting_offset, max_results) = bounds(r.starting_offset, r.max_results)?;
        if base.volume.node != target.volume.node {
            // Restores and clones stay on their source's node: snapshots on two nodes
            // share no lineage.
            return Err(Status::failed_precondition(format!(
                "snapshot {target} does not descend from snapshot {base}: they live on different nodes; take a full backup"
            )));
        }
        let node = target.volume.node.clone();
        let mut client = self.registry.client(&node)?;
        let pages = client
            .get_delta(pb::GetDeltaRequest {
                base: Some(node_ref(&base)),
                target: Some(node_ref(&target)),
                starting_offset,
                max_results,
                style: self.style.node() as i32,
            })
            .await
            .map_err(|e| relay(&node, e))?
            .into_inner();
        let kind = self.style.csi() as i32;
        let out = pages.map(move |p| {
            let p = p.map_err(|e| relay(&node, e))?;
            Ok(csi::GetMetadataDeltaResponse {
                block_metadata_type: kind,
                volume_capacity_bytes: p.size_bytes as i64,
                block_metadata: ranges(&p),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}
