//! The CSI Controller service. Stateless: it decides which node a volume lives on and
//! sends the work to that node's agent; every ID names its node, so nothing needs
//! remembering (see docs/csi.md).

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::ids::{token, GroupId, SnapshotId, VolumeId};
use super::params::{self, Access, SnapshotParams, VolumeParams, DEFAULT_FS};
use super::proto::csi::{self, controller_service_capability::rpc::Type as Cap};
use super::proto::node as pb;
use super::registry::{AgentClient, Registry};
use super::status;

/// The Controller service.
pub struct Controller {
    pub driver_name: String,
    pub registry: Arc<Registry>,
}

/// The capabilities this controller has.
pub const CAPABILITIES: [Cap; 8] = [
    Cap::CreateDeleteVolume,
    Cap::CreateDeleteSnapshot,
    Cap::ListSnapshots,
    Cap::ListVolumes,
    Cap::GetCapacity,
    Cap::CloneVolume,
    Cap::ExpandVolume,
    Cap::SingleNodeMultiWriter,
];

impl Controller {
    /// The topology key: `topology.<driver name>/node`.
    pub fn topology_key(&self) -> String {
        topology_key(&self.driver_name)
    }

    fn topology(&self, node: &str) -> csi::Topology {
        csi::Topology {
            segments: HashMap::from([(self.topology_key(), node.to_string())]),
        }
    }

    /// The node a topology names, if it names one with our key.
    fn node_of(&self, t: &csi::Topology) -> Option<String> {
        t.segments.get(&self.topology_key()).cloned()
    }

    fn agent(&self, node: &str) -> Result<AgentClient, Status> {
        self.registry.client(node)
    }

    /// The nodes a new volume may go to, best first: the preferred ones that the
    /// requisite allows (the scheduler's choice comes first), then the other allowed ones
    /// by free space; with no requirements, every live node by free space.
    async fn placement(
        &self,
        req: Option<&csi::TopologyRequirement>,
    ) -> Result<Vec<String>, Status> {
        let live: Vec<String> = self.registry.live().into_iter().map(|(n, _)| n).collect();
        let Some(req) = req.filter(|r| !r.requisite.is_empty() || !r.preferred.is_empty()) else {
            let mut by_space = self.free_space(&live).await;
            by_space.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            return Ok(by_space.into_iter().map(|(n, _)| n).collect());
        };
        let allowed: Vec<String> = if req.requisite.is_empty() {
            req.preferred
                .iter()
                .filter_map(|t| self.node_of(t))
                .collect()
        } else {
            req.requisite
                .iter()
                .filter_map(|t| self.node_of(t))
                .collect()
        };
        if allowed.is_empty() {
            return Err(Status::invalid_argument(format!(
                "accessibility_requirements name no node with the topology key {}",
                self.topology_key()
            )));
        }
        let mut order: Vec<String> = req
            .preferred
            .iter()
            .filter_map(|t| self.node_of(t))
            .filter(|n| allowed.contains(n))
            .collect();
        let mut rest: Vec<String> = allowed.into_iter().filter(|n| !order.contains(n)).collect();
        rest.dedup();
        let mut rest = self.free_space(&rest).await;
        rest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        order.extend(rest.into_iter().map(|(n, _)| n));
        order.dedup();
        Ok(order)
    }

    /// Free bytes of each node that answers (nodes that do not are left out).
    async fn free_space(&self, nodes: &[String]) -> Vec<(String, u64)> {
        let mut out = vec![];
        for n in nodes {
            let Ok(mut c) = self.agent(n) else { continue };
            if let Ok(r) = c.info(pb::InfoRequest {}).await {
                let free = r.into_inner().capacity.map_or(0, |c| c.available_bytes);
                out.push((n.clone(), free));
            }
        }
        out
    }

    /// A live volume by ID, with a client of its node; NotFound when there is none.
    async fn find_volume(
        &self,
        volume_id: &str,
    ) -> Result<(VolumeId, AgentClient, pb::Volume), Status> {
        let id = VolumeId::parse(volume_id).map_err(|e| Status::not_found(e.to_string()))?;
        let mut c = self.agent(&id.node)?;
        let v = c
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .map_err(|e| relay(&id.node, e))?
            .into_inner()
            .volumes
            .into_iter()
            .find(|v| v.key == id.key)
            .ok_or_else(|| Status::not_found(format!("no volume {volume_id}")))?;
        Ok((id, c, v))
    }

    /// The volume a CreateVolume name already made on some live node that answers.
    async fn find_by_name(&self, name: &str) -> Result<Option<(String, pb::Volume)>, Status> {
        for (node, mut c) in self.registry.live() {
            let r = match c
                .list_volumes(pb::ListVolumesRequest {
                    name: name.to_string(),
                })
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    skipped(&node, &e, "volume name check");
                    continue;
                }
            };
            if let Some(v) = r.into_inner().volumes.into_iter().next() {
                return Ok(Some((node, v)));
            }
        }
        Ok(None)
    }

    fn volume_pb(
        &self,
        node: &str,
        v: &pb::Volume,
        source: Option<csi::VolumeContentSource>,
    ) -> csi::Volume {
        let id = VolumeId {
            node: node.to_string(),
            key: v.key.clone(),
        };
        let mut context = HashMap::new();
        if !v.fs_type.is_empty() {
            context.insert("fsType".to_string(), v.fs_type.clone());
        }
        csi::Volume {
            capacity_bytes: v.capacity_bytes as i64,
            volume_id: id.to_string(),
            volume_context: context,
            content_source: source,
            accessible_topology: vec![self.topology(node)],
        }
    }

    /// The snapshots that a ListSnapshots request selects, in ID order.
    async fn select_snapshots(
        &self,
        r: &csi::ListSnapshotsRequest,
    ) -> Result<Vec<csi::Snapshot>, Status> {
        let (nodes, filter) = if !r.snapshot_id.is_empty() {
            let Ok(id) = SnapshotId::parse(&r.snapshot_id) else {
                return Ok(vec![]);
            };
            if !r.source_volume_id.is_empty() && r.source_volume_id != id.volume.to_string() {
                return Ok(vec![]);
            }
            let f = pb::ListSnapshotsRequest {
                volume_key: id.volume.key.clone(),
                id: id.id,
                name: String::new(),
            };
            (vec![id.volume.node], f)
        } else if !r.source_volume_id.is_empty() {
            let Ok(v) = VolumeId::parse(&r.source_volume_id) else {
                return Ok(vec![]);
            };
            let f = pb::ListSnapshotsRequest {
                volume_key: v.key,
                ..Default::default()
            };
            (vec![v.node], f)
        } else {
            let nodes = self.registry.live().into_iter().map(|(n, _)| n).collect();
            (nodes, pb::ListSnapshotsRequest::default())
        };
        let mut out = vec![];
        for node in nodes {
            let mut c = match self.agent(&node) {
                Ok(c) => c,
                // A snapshot of an unknown node: for a listing by ID, say why it is
                // missing (the snapshotter retries); for a listing of all, list the rest.
                Err(e) if !r.snapshot_id.is_empty() || !r.source_volume_id.is_empty() => {
                    return Err(e)
                }
                Err(_) => continue,
            };
            let list = c
                .list_snapshots(filter.clone())
                .await
                .map_err(|e| relay(&node, e))?;
            out.extend(
                list.into_inner()
                    .snapshots
                    .iter()
                    .map(|s| snapshot_pb(&node, s)),
            );
        }
        out.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        Ok(out)
    }
}

/// The CSI form of snapshot `s` of node `node`; a member of a group snapshot names its
/// group.
pub(crate) fn snapshot_pb(node: &str, s: &pb::Snapshot) -> csi::Snapshot {
    let volume = VolumeId {
        node: node.to_string(),
        key: s.volume_key.clone(),
    };
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: SnapshotId {
            volume: volume.clone(),
            id: s.id,
        }
        .to_string(),
        source_volume_id: volume.to_string(),
        creation_time: Some(timestamp(s.created_unix_ms)),
        // A cut is complete when it returns: nothing is uploaded or copied later.
        ready_to_use: true,
        group_snapshot_id: GroupId::of_member(&s.name)
            .map(|g| g.to_string())
            .unwrap_or_default(),
    }
}

pub(crate) fn timestamp(unix_ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (unix_ms / 1000) as i64,
        nanos: ((unix_ms % 1000) * 1_000_000) as i32,
    }
}

/// The topology key of a driver.
pub fn topology_key(driver_name: &str) -> String {
    format!("topology.{driver_name}/node")
}

/// A node that did not answer a driver-wide check: the check goes on without it, so one
/// node down does not stop the others (its names cannot be checked until it is back).
pub(crate) fn skipped(node: &str, e: &Status, what: &str) {
    tracing::warn!(node, code = ?e.code(), error = %e.message(), "{what}: node did not answer; checked without it");
}

/// A node's error, passed on with the node named (its code is the CSI code already).
pub(crate) fn relay(node: &str, e: Status) -> Status {
    let code = match e.code() {
        // The node could not be reached at all.
        Code::Unknown | Code::Cancelled => Code::Unavailable,
        c => c,
    };
    Status::new(code, format!("node {node}: {}", e.message()))
}

/// One page of `items` (sorted by `id`) after `starting_token`.
fn page<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> &str,
    starting_token: &str,
    max_entries: i32,
) -> Result<(Vec<T>, String), Status> {
    if max_entries < 0 {
        return Err(Status::invalid_argument("max_entries cannot be negative"));
    }
    let after = if starting_token.is_empty() {
        None
    } else {
        Some(token::parse(starting_token).ok_or_else(|| {
            Status::aborted(format!(
                "starting_token {starting_token:?} was not made by this driver"
            ))
        })?)
    };
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|i| after.as_deref().is_none_or(|a| id(i) > a))
        .collect();
    let mut next = String::new();
    if max_entries > 0 && rest.len() > max_entries as usize {
        rest.truncate(max_entries as usize);
        if let Some(last) = rest.last() {
            next = token::after(id(last));
        }
    }
    Ok((rest, next))
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    #[tracing::instrument(skip_all, err, fields(name = %req.get_ref().name))]
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        status::required(&r.name, "name")?;
        let accesses = params::accesses(&r.volume_capabilities)?;
        let p = VolumeParams::try_from(&r.parameters)?;
        let size = params::volume_size(r.capacity_range.as_ref(), p.block_size)?;
        let block = accesses.iter().all(|a| *a == Access::Block);
        let fs_type = if block {
            String::new()
        } else {
            accesses
                .iter()
                .find_map(|a| match a {
                    Access::Mount { fs_type, .. } if !fs_type.is_empty() => Some(fs_type.clone()),
                    _ => None,
                })
                .or(p.fs_type)
                .unwrap_or_else(|| DEFAULT_FS.to_string())
        };
        // A file system with a minimum size gets it when the range allows (CSI lets a
        // volume be larger than required, up to the limit).
        let min = params::min_size(&fs_type);
        let size = match r.capacity_range.as_ref().map_or(0, |c| c.limit_bytes) {
            _ if size >= min => size,
            limit if limit == 0 || limit as u64 >= min => min,
            limit => {
                return Err(Status::out_of_range(format!(
                    "{fs_type} needs at least {min} bytes; limit_bytes is {limit}"
                )))
            }
        };

        // Where the content comes from decides the node: a restore or clone stays on
        // its source's node, because no data is copied.
        let (source, source_node) = match r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => (None, None),
            Some(csi::volume_content_source::Type::Snapshot(s)) => {
                let id = SnapshotId::parse(&s.snapshot_id)
                    .map_err(|e| Status::not_found(format!("source snapshot: {e}")))?;
                let src = pb::VolumeSource {
                    kind: Some(pb::volume_source::Kind::Snapshot(pb::SnapshotRef {
                        volume_key: id.volume.key.clone(),
                        snapshot_id: id.id,
                    })),
                };
                (Some(src), Some(id.volume.node))
            }
            Some(csi::volume_content_source::Type::Volume(v)) => {
                let id = VolumeId::parse(&v.volume_id)
                    .map_err(|e| Status::not_found(format!("source volume: {e}")))?;
                let src = pb::VolumeSource {
                    kind: Some(pb::volume_source::Kind::VolumeKey(id.key.clone())),
                };
                (Some(src), Some(id.node))
            }
        };

        if let Some((node, v)) = self.find_by_name(&r.name).await? {
            // A retry: the node checks that the arguments match.
            let mut c = self.agent(&node)?;
            let again = c
                .create_volume(pb::CreateVolumeRequest {
                    name: r.name.clone(),
                    capacity_bytes: size,
                    block_size: p.block_size,
                    fs_type: fs_type.clone(),
                    source: source.clone(),
                })
                .await
                .map_err(|e| relay(&node, e))?
                .into_inner();
            let v = again.volume.unwrap_or(v);
            return Ok(Response::new(csi::CreateVolumeResponse {
                volume: Some(self.volume_pb(&node, &v, r.volume_content_source.clone())),
            }));
        }

        let candidates = match &source_node {
            Some(node) => {
                let allowed = self
                    .placement(r.accessibility_requirements.as_ref())
                    .await?;
                let constrained = r
                    .accessibility_requirements
                    .as_ref()
                    .is_some_and(|t| !t.requisite.is_empty() || !t.preferred.is_empty());
                if constrained && !allowed.contains(node) {
                    return Err(Status::resource_exhausted(format!(
                        "the source lives on node {node}, which the volume's topology requirements exclude: a restore or clone is made on its source's node without copying data"
                    )));
                }
                vec![node.clone()]
            }
            None => {
                self.placement(r.accessibility_requirements.as_ref())
                    .await?
            }
        };
        let Some(node) = candidates.first().cloned() else {
            return Err(Status::unavailable(
                "no snapblk node plugin is registered with the controller (or none that the topology allows answers)",
            ));
        };
        let mut c = self.agent(&node)?;
        if source.is_none() {
            let info = c
                .info(pb::InfoRequest {})
                .await
                .map_err(|e| relay(&node, e))?
                .into_inner();
            let free = info.capacity.map_or(0, |c| c.available_bytes);
            if free < size {
                return Err(Status::resource_exhausted(format!(
                    "node {node} has {free} bytes free, less than the {size} bytes asked for"
                )));
            }
        }
        let v = c
            .create_volume(pb::CreateVolumeRequest {
                name: r.name.clone(),
                capacity_bytes: size,
                block_size: p.block_size,
                fs_type,
                source,
            })
            .await
            .map_err(|e| relay(&node, e))?
            .into_inner()
            .volume
            .ok_or_else(|| Status::internal(format!("node {node} answered without a volume")))?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(self.volume_pb(&node, &v, r.volume_content_source.clone())),
        }))
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        status::required(&r.volume_id, "volume_id")?;
        // An ID this driver never made names nothing to delete.
        let Ok(id) = VolumeId::parse(&r.volume_id) else {
            return Ok(Response::new(csi::DeleteVolumeResponse {}));
        };
        self.agent(&id.node)?
            .delete_volume(pb::DeleteVolumeRequest { key: id.key })
            .await
            .map_err(|e| relay(&id.node, e))?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "snapblk volumes need no attach step (CSIDriver attachRequired: false)",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "snapblk volumes need no attach step (CSIDriver attachRequired: false)",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        status::required(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(status::missing("volume_capabilities"));
        }
        let (_, _, v) = self.find_volume(&r.volume_id).await?;
        let checked = params::accesses(&r.volume_capabilities).and_then(|all| {
            VolumeParams::try_from(&r.parameters)?;
            for a in &all {
                match a {
                    Access::Block => {}
                    Access::Mount { fs_type, .. }
                        if fs_type.is_empty() || *fs_type == v.fs_type || v.fs_type.is_empty() => {}
                    Access::Mount { fs_type, .. } => {
                        return Err(Status::invalid_argument(format!(
                            "the volume holds {} (asked: {fs_type})",
                            v.fs_type
                        )))
                    }
                }
            }
            Ok(())
        });
        Ok(Response::new(match checked {
            Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(e) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_string(),
            },
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        // Check the token before asking the nodes.
        page(
            Vec::<String>::new(),
            |s| s,
            &r.starting_token,
            r.max_entries,
        )?;
        let mut all = vec![];
        for (node, mut c) in self.registry.live() {
            match c.list_volumes(pb::ListVolumesRequest::default()).await {
                Ok(list) => all.extend(
                    list.into_inner()
                        .volumes
                        .iter()
                        .map(|v| self.volume_pb(&node, v, None)),
                ),
                Err(e) => {
                    tracing::warn!(node, error = %e.message(), "node did not list its volumes; they are missing from ListVolumes")
                }
            }
        }
        all.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        let (items, next_token) = page(all, |v| &v.volume_id, &r.starting_token, r.max_entries)?;
        Ok(Response::new(csi::ListVolumesResponse {
            entries: items
                .into_iter()
                .map(|v| csi::list_volumes_response::Entry {
                    volume: Some(v),
                    status: None,
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        let nodes: Vec<String> = match r.accessible_topology.as_ref() {
            Some(t) => self.node_of(t).into_iter().collect(),
            None => self.registry.live().into_iter().map(|(n, _)| n).collect(),
        };
        let free = self.free_space(&nodes).await;
        let total: u64 = free.iter().map(|(_, f)| *f).sum();
        let largest = free.iter().map(|(_, f)| *f).max().unwrap_or(0);
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: total.min(i64::MAX as u64) as i64,
            // A volume lives on one node: none can be larger than the emptiest node.
            maximum_volume_size: Some(largest.min(i64::MAX as u64) as i64),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{Rpc, Type};
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: CAPABILITIES
                .iter()
                .map(|c| csi::ControllerServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: *c as i32 })),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, err, fields(name = %req.get_ref().name, volume = %req.get_ref().source_volume_id))]
    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        status::required(&r.name, "name")?;
        status::required(&r.source_volume_id, "source_volume_id")?;
        if GroupId::of_member(&r.name).is_some() {
            return Err(Status::invalid_argument(format!(
                "snapshot name {:?}: names of the form vgs-<32 hex digits>-<key> are kept for the members of group snapshots",
                r.name
            )));
        }
        let p = SnapshotParams::try_from(&r.parameters)?;
        let id = VolumeId::parse(&r.source_volume_id)
            .map_err(|e| Status::not_found(format!("source volume: {e}")))?;
        // Snapshot names are unique across the driver: the source's node checks its own
        // volumes, the other nodes are asked here.
        for (node, mut c) in self.registry.live() {
            if node == id.node {
                continue;
            }
            let found = match c
                .list_snapshots(pb::ListSnapshotsRequest {
                    name: r.name.clone(),
                    ..Default::default()
                })
                .await
            {
                Ok(r) => r.into_inner().snapshots,
                Err(e) => {
                    skipped(&node, &e, "snapshot name check");
                    continue;
                }
            };
            if let Some(other) = found.first() {
                return Err(Status::already_exists(format!(
                    "a snapshot named {:?} exists, of volume {node}/{}",
                    r.name, other.volume_key
                )));
            }
        }
        let s = self
            .agent(&id.node)?
            .create_snapshot(pb::CreateSnapshotRequest {
                volume_key: id.key.clone(),
                name: r.name.clone(),
                freeze: p.freeze as i32,
                freeze_timeout_ms: p.freeze_timeout.map_or(0, |d| d.as_millis() as u64),
            })
            .await
            .map_err(|e| relay(&id.node, e))?
            .into_inner()
            .snapshot
            .ok_or_else(|| {
                Status::internal(format!("node {} answered without a snapshot", id.node))
            })?;
        tracing::info!(snapshot = s.id, consistency = %s.consistency, freeze_us = s.freeze_us, frozen_us = s.frozen_us, "snapshot taken");
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(snapshot_pb(&id.node, &s)),
        }))
    }

    #[tracing::instrument(skip_all, err, fields(snapshot = %req.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        status::required(&r.snapshot_id, "snapshot_id")?;
        let Ok(id) = SnapshotId::parse(&r.snapshot_id) else {
            return Ok(Response::new(csi::DeleteSnapshotResponse {}));
        };
        self.agent(&id.volume.node)?
            .delete_snapshot(pb::DeleteSnapshotRequest {
                volume_key: id.volume.key.clone(),
                id: id.id,
            })
            .await
            .map_err(|e| relay(&id.volume.node, e))?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        page(
            Vec::<String>::new(),
            |s| s,
            &r.starting_token,
            r.max_entries,
        )?;
        let all = self.select_snapshots(&r).await?;
        let (items, next_token) = page(all, |s| &s.snapshot_id, &r.starting_token, r.max_entries)?;
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries: items
                .into_iter()
                .map(|s| csi::list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        status::required(&r.snapshot_id, "snapshot_id")?;
        let found = self
            .select_snapshots(&csi::ListSnapshotsRequest {
                snapshot_id: r.snapshot_id.clone(),
                ..Default::default()
            })
            .await?;
        let s = found
            .into_iter()
            .next()
            .ok_or_else(|| Status::not_found(format!("no snapshot {}", r.snapshot_id)))?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(s),
        }))
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        status::required(&r.volume_id, "volume_id")?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| status::missing("capacity_range"))?;
        let access = match &r.volume_capability {
            Some(c) => Some(params::access(c)?),
            None => None,
        };
        let (id, mut c, v) = self.find_volume(&r.volume_id).await?;
        let size = params::volume_size(Some(range), v.block_size)?;
        let done = c
            .expand_volume(pb::ExpandVolumeRequest {
                key: id.key.clone(),
                capacity_bytes: size,
            })
            .await
            .map_err(|e| relay(&id.node, e))?
            .into_inner();
        let block = match access {
            Some(a) => a == Access::Block,
            None => v.fs_type.is_empty(),
        };
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: done.capacity_bytes as i64,
            // A file system must grow with its device, on the node, once it is mounted.
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerGetVolume is not offered"))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "snapblk volumes have no mutable parameters (no VolumeAttributesClass support)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_resume_after_the_last_id() {
        let items: Vec<String> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (p1, t1) = page(items.clone(), |s| s, "", 2).expect("p1");
        assert_eq!(p1, ["a", "b"]);
        let (p2, t2) = page(items.clone(), |s| s, &t1, 2).expect("p2");
        assert_eq!(p2, ["c", "d"]);
        // "c" deleted between pages, "bb" added before the cursor: the cursor holds.
        let changed: Vec<String> = ["a", "b", "bb", "d", "e"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (p3, t3) = page(changed, |s| s, &t2, 2).expect("p3");
        assert_eq!(p3, ["e"]);
        assert!(t3.is_empty());
        let (all, t) = page(items.clone(), |s| s, "", 0).expect("all");
        assert_eq!(all.len(), 5);
        assert!(t.is_empty());
        assert_eq!(
            page(items.clone(), |s| s, "invalid-token", 0)
                .expect_err("token")
                .code(),
            Code::Aborted
        );
        assert_eq!(
            page(items, |s| s, "", -1).expect_err("negative").code(),
            Code::InvalidArgument
        );
    }
}
