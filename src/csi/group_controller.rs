//! The CSI GroupController service: group snapshots, one consistency point across volumes
//! that may live on several nodes (a database with its data on one PVC and its WAL on
//! another).
//!
//! The window: every member volume is frozen first (in parallel, each by the agent of its
//! node, which holds the volume daemon's control connection for the window), then every
//! member is cut (with no freeze of its own), then every volume is thawed. One deadline,
//! the class's `freezeTimeout`, bounds the whole window: the nodes' freezes end at it even
//! if this controller or an agent dies (the agent closes the daemon's connection at the
//! deadline, and the daemon's watchdog thaws at the same deadline even if the daemon
//! dies), and a cut that is not done by then fails the call. Any failure thaws everything
//! and removes the snapshots already cut.
//!
//! Stateless: the group ID is `group:<digest of the name>`, and each member snapshot is
//! named `vgs-<digest>-<volume key>` on its volume's node, so the group's membership lives
//! with its snapshots; a retried call finds them by name (see docs/csi.md).

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tonic::{Request, Response, Status};

use super::controller::{relay, skipped, snapshot_pb, timestamp};
use super::ids::{GroupId, SnapshotId, VolumeId};
use super::params::GroupSnapshotParams;
use super::proto::csi::{self, group_controller_service_capability::rpc::Type as Cap};
use super::proto::node as pb;
use super::registry::{AgentClient, Registry};
use super::status;

/// Response metadata of CreateVolumeGroupSnapshot: microseconds from the first freeze
/// asked to the last thaw answered (the longest any member's file system can have been
/// frozen), when this call took the group.
pub const FREEZE_WINDOW_HEADER: &str = "snapblk-freeze-window-us";

/// How long a thaw may take to answer (the freeze ends at its deadline anyway).
const THAW_TIMEOUT: Duration = Duration::from_secs(30);

/// How long past the window's deadline a freeze or a cut may take to answer. The answer
/// is still awaited (a late freeze must be thawed at once, a late cut removed, so nothing
/// outlives the failed call), though the window has failed: no freeze lasts longer for
/// it, since each node ends its freeze at the deadline by itself.
const LATE_ANSWER: Duration = Duration::from_secs(30);

/// The GroupController service.
pub struct GroupController {
    pub registry: Arc<Registry>,
    /// Group names with a CreateVolumeGroupSnapshot in progress.
    creating: Mutex<HashSet<String>>,
}

/// A member snapshot found on its node.
struct Member {
    node: String,
    snap: pb::Snapshot,
}

impl Member {
    fn id(&self) -> SnapshotId {
        SnapshotId {
            volume: self.volume(),
            id: self.snap.id,
        }
    }

    fn volume(&self) -> VolumeId {
        VolumeId {
            node: self.node.clone(),
            key: self.snap.volume_key.clone(),
        }
    }
}

/// Releases a group name claimed for creation.
struct Claim<'a> {
    set: &'a Mutex<HashSet<String>>,
    name: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.name);
    }
}

/// What the window measured.
struct Window {
    /// First freeze asked to last thaw answered.
    total: Duration,
    /// The longest a file system was frozen, as its node measured it (end of FIFREEZE to
    /// end of thaw).
    frozen_max_us: u64,
}

impl GroupController {
    pub fn new(registry: Arc<Registry>) -> GroupController {
        GroupController {
            registry,
            creating: Mutex::default(),
        }
    }

    fn claim(&self, name: &str) -> Result<Claim<'_>, Status> {
        if !self.creating.lock().insert(name.to_string()) {
            return Err(Status::aborted(format!(
                "a CreateVolumeGroupSnapshot named {name:?} is in progress"
            )));
        }
        Ok(Claim {
            set: &self.creating,
            name: name.to_string(),
        })
    }

    /// The members of group `g` on every live node, in ID order. The nodes in `must` have
    /// to answer (a group call names them); others that do not are skipped.
    async fn members(&self, g: &GroupId, must: &[String]) -> Result<Vec<Member>, Status> {
        let mut nodes: BTreeSet<String> =
            self.registry.live().into_iter().map(|(n, _)| n).collect();
        nodes.extend(must.iter().cloned());
        let mut out = vec![];
        for node in nodes {
            let required = must.contains(&node);
            let mut c = match self.registry.client(&node) {
                Ok(c) => c,
                Err(e) if required => return Err(e),
                Err(_) => continue,
            };
            match c.list_snapshots(pb::ListSnapshotsRequest::default()).await {
                Ok(r) => out.extend(
                    r.into_inner()
                        .snapshots
                        .into_iter()
                        .filter(|s| GroupId::of_member(&s.name).as_ref() == Some(g))
                        .map(|snap| Member {
                            node: node.clone(),
                            snap,
                        }),
                ),
                Err(e) if required => return Err(relay(&node, e)),
                Err(e) => skipped(&node, &e, "group snapshot member search"),
            }
        }
        out.sort_by_key(|m| m.id().to_string());
        Ok(out)
    }

    /// Checks the CO's `snapshot_ids` against the members found: a listed snapshot that
    /// exists and is not a member is a mismatch; with `exact`, so is a member not listed.
    async fn check_listed(
        &self,
        g: &GroupId,
        listed: &[SnapshotId],
        members: &[Member],
        exact: bool,
    ) -> Result<(), Status> {
        let ids: HashSet<SnapshotId> = members.iter().map(Member::id).collect();
        for id in listed.iter().filter(|id| !ids.contains(id)) {
            let node = &id.volume.node;
            let found = self
                .registry
                .client(node)?
                .list_snapshots(pb::ListSnapshotsRequest {
                    volume_key: id.volume.key.clone(),
                    id: id.id,
                    name: String::new(),
                })
                .await
                .map_err(|e| relay(node, e))?
                .into_inner()
                .snapshots;
            if !found.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "snapshot_ids: {id} is not a member of group snapshot {g}"
                )));
            }
        }
        if exact && !listed.is_empty() {
            if let Some(m) = members.iter().find(|m| !listed.contains(&m.id())) {
                return Err(Status::invalid_argument(format!(
                    "snapshot_ids: group snapshot {g} also holds {}, which is not listed",
                    m.id()
                )));
            }
        }
        Ok(())
    }

    /// Deletes `members`; the first failure is returned after trying them all.
    async fn remove(&self, members: &[Member]) -> Result<(), Status> {
        let mut first = Ok(());
        for m in members {
            let r = match self.registry.client(&m.node) {
                Ok(mut c) => c
                    .delete_snapshot(pb::DeleteSnapshotRequest {
                        volume_key: m.snap.volume_key.clone(),
                        id: m.snap.id,
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| relay(&m.node, e)),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::error!(snapshot = %m.id(), error = %e.message(), "could not delete a group snapshot member");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Removes the members of `g` cut for `vols` by a failed window (found by name, so a
    /// cut whose answer was lost goes too). Failures are logged: a retry of the same
    /// name removes what is left.
    async fn remove_cut(&self, g: &GroupId, vols: &[VolumeId]) {
        let mut found = vec![];
        for v in vols {
            let r = match self.registry.client(&v.node) {
                Ok(mut c) => c
                    .list_snapshots(pb::ListSnapshotsRequest {
                        volume_key: v.key.clone(),
                        id: 0,
                        name: g.member_name(&v.key),
                    })
                    .await
                    .map_err(|e| relay(&v.node, e)),
                Err(e) => Err(e),
            };
            match r {
                Ok(list) => {
                    found.extend(list.into_inner().snapshots.into_iter().map(|snap| Member {
                        node: v.node.clone(),
                        snap,
                    }))
                }
                Err(e) => {
                    tracing::error!(group = %g, volume = %v, error = %e.message(), "cannot check for a member cut by the failed group snapshot; a retry of the same name removes it")
                }
            }
        }
        if !found.is_empty() {
            let ids: Vec<String> = found.iter().map(|m| m.id().to_string()).collect();
            match self.remove(&found).await {
                Ok(()) => {
                    tracing::info!(group = %g, snapshots = ?ids, "removed the snapshots the failed group snapshot had cut")
                }
                Err(e) => {
                    tracing::error!(group = %g, snapshots = ?ids, error = %e.message(), "could not remove every snapshot the failed group snapshot had cut; a retry of the same name removes them")
                }
            }
        }
    }

    /// Thaws every freeze in `held` (volume, node's client, handle); returns the longest
    /// time a file system was frozen, as the nodes measured it. Failures are logged: the
    /// freeze ends at its deadline anyway.
    async fn thaw_all(&self, g: &GroupId, held: &[(VolumeId, AgentClient, String)]) -> u64 {
        let tasks: Vec<_> = held
            .iter()
            .map(|(v, c, handle)| {
                let mut c = c.clone();
                let req = pb::ThawVolumeRequest {
                    handle: handle.clone(),
                };
                (
                    v.clone(),
                    tokio::spawn(async move {
                        bounded(Instant::now() + THAW_TIMEOUT, c.thaw_volume(req)).await
                    }),
                )
            })
            .collect();
        let mut frozen_max_us = 0;
        for (v, r) in gather(tasks).await {
            match r {
                Ok(t) => {
                    frozen_max_us = frozen_max_us.max(t.frozen_us);
                    if t.expired {
                        tracing::warn!(group = %g, volume = %v, "the freeze had already ended at its deadline when the thaw came");
                    }
                }
                Err(e) => {
                    tracing::warn!(group = %g, volume = %v, error = %e.message(), "thaw failed; the file system thaws at the freeze deadline at the latest")
                }
            }
        }
        frozen_max_us
    }

    /// The window: freeze every volume, cut every member, thaw every volume.
    async fn take(
        &self,
        name: &str,
        g: &GroupId,
        vols: &[VolumeId],
        timeout: Duration,
    ) -> Result<(Vec<Member>, Window), Status> {
        // Every node must be reachable before anything is frozen.
        let clients: Vec<(VolumeId, AgentClient)> = vols
            .iter()
            .map(|v| Ok((v.clone(), self.registry.client(&v.node)?)))
            .collect::<Result<_, Status>>()?;
        let t0 = Instant::now();
        let deadline = t0 + timeout;

        // 1. Freeze everything, in parallel.
        let tasks: Vec<_> = clients
            .iter()
            .map(|(v, c)| {
                let mut c = c.clone();
                let req = pb::FreezeVolumeRequest {
                    volume_key: v.key.clone(),
                    timeout_ms: remaining_ms(deadline),
                    reason: format!("group snapshot {name}"),
                };
                (
                    v.clone(),
                    tokio::spawn(async move {
                        bounded(deadline + LATE_ANSWER, c.freeze_volume(req)).await
                    }),
                )
            })
            .collect();
        let mut held = vec![];
        let mut failed = None;
        let mut consistency = vec![];
        for ((v, r), (_, c)) in gather(tasks).await.into_iter().zip(&clients) {
            match r {
                Ok(f) if !f.handle.is_empty() => {
                    consistency.push((v.clone(), "application", f.freeze_us));
                    held.push((v, c.clone(), f.handle));
                }
                Ok(f) if f.staged && vols.len() > 1 => {
                    failed.get_or_insert(Status::failed_precondition(format!(
                        "volume {v} is staged with no file system to freeze (raw block access): its writes cannot be held for a point common to the other volumes; take its snapshot on its own, or stop its user first"
                    )));
                }
                Ok(f) => consistency.push((
                    v.clone(),
                    if f.staged {
                        "crash (staged with no file system to freeze)"
                    } else {
                        "crash (not staged: nothing writes to it)"
                    },
                    0,
                )),
                Err(e) => {
                    failed.get_or_insert(relay(&v.node, e));
                }
            }
        }
        let frozen_done = t0.elapsed();
        if failed.is_none() && Instant::now() > deadline {
            failed = Some(Status::deadline_exceeded(format!(
                "the group's window passed its freezeTimeout of {} ms before every volume was frozen (after {} ms)",
                timeout.as_millis(),
                frozen_done.as_millis()
            )));
        }
        if let Some(e) = failed {
            self.thaw_all(g, &held).await;
            tracing::warn!(group = %g, name, error = %e.message(), "group snapshot failed while freezing; every volume thawed, nothing was cut");
            return Err(e);
        }

        // 2. Cut every member; no freeze of its own: the file systems are frozen already.
        let tasks: Vec<_> = clients
            .iter()
            .map(|(v, c)| {
                let mut c = c.clone();
                let req = pb::CreateSnapshotRequest {
                    volume_key: v.key.clone(),
                    name: g.member_name(&v.key),
                    freeze: pb::FreezeMode::FreezeNone as i32,
                    freeze_timeout_ms: 0,
                };
                (
                    v.clone(),
                    tokio::spawn(async move {
                        bounded(deadline + LATE_ANSWER, c.create_snapshot(req)).await
                    }),
                )
            })
            .collect();
        let mut cut = vec![];
        let mut failed = None;
        for (v, r) in gather(tasks).await {
            match r.and_then(|s| {
                s.snapshot
                    .ok_or_else(|| Status::internal("the node answered without a snapshot"))
            }) {
                Ok(snap) => cut.push(Member {
                    node: v.node.clone(),
                    snap,
                }),
                Err(e) => {
                    failed.get_or_insert(relay(&v.node, e));
                }
            }
        }
        let cut_done = t0.elapsed();
        if failed.is_none() && Instant::now() > deadline {
            failed = Some(Status::deadline_exceeded(format!(
                "the group's window passed its freezeTimeout of {} ms before every member was cut (frozen after {} ms, cut after {} ms)",
                timeout.as_millis(),
                frozen_done.as_millis(),
                cut_done.as_millis()
            )));
        }

        // 3. Thaw everything.
        let frozen_max_us = self.thaw_all(g, &held).await;
        let total = t0.elapsed();
        if let Some(e) = failed {
            self.remove_cut(g, vols).await;
            tracing::warn!(group = %g, name, error = %e.message(), window_us = total.as_micros() as u64, "group snapshot failed while cutting; every volume thawed, the snapshots cut removed");
            return Err(Status::new(
                e.code(),
                format!(
                    "{}; every volume was thawed and the snapshots already cut removed",
                    e.message()
                ),
            ));
        }
        for (v, how, freeze_us) in &consistency {
            tracing::info!(group = %g, volume = %v, consistency = how, freeze_us, "group snapshot member");
        }
        tracing::info!(
            group = %g,
            name,
            members = cut.len(),
            frozen = held.len(),
            window_us = total.as_micros() as u64,
            frozen_max_us,
            freeze_phase_us = frozen_done.as_micros() as u64,
            cut_phase_us = (cut_done - frozen_done).as_micros() as u64,
            "group snapshot taken: every member frozen, then cut, then thawed"
        );
        cut.sort_by_key(|m| m.id().to_string());
        Ok((
            cut,
            Window {
                total,
                frozen_max_us,
            },
        ))
    }
}

/// The CSI form of group `g` made of `members`.
fn group_pb(g: &GroupId, members: &[Member]) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: g.to_string(),
        snapshots: members
            .iter()
            .map(|m| snapshot_pb(&m.node, &m.snap))
            .collect(),
        // All members were cut inside one window: the first cut names its time.
        creation_time: Some(timestamp(
            members
                .iter()
                .map(|m| m.snap.created_unix_ms)
                .min()
                .unwrap_or(0),
        )),
        ready_to_use: true,
    }
}

/// Milliseconds left until `deadline` (at least 1).
fn remaining_ms(deadline: Instant) -> u64 {
    (deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64)
        .max(1)
}

/// `call`'s answer, or DEADLINE_EXCEEDED when none comes by `deadline`.
async fn bounded<T>(
    deadline: Instant,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), call).await {
        Ok(r) => r.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(
            "no answer within the group snapshot's deadline",
        )),
    }
}

/// The results of tasks spawned per volume, in order.
async fn gather<T>(
    tasks: Vec<(VolumeId, tokio::task::JoinHandle<Result<T, Status>>)>,
) -> Vec<(VolumeId, Result<T, Status>)> {
    let mut out = Vec::with_capacity(tasks.len());
    for (v, t) in tasks {
        out.push((v, t.await.map_err(status::join).and_then(|r| r)));
    }
    out
}

/// The snapshot IDs a Get or Delete lists; one this driver did not make is a mismatch.
fn listed(ids: &[String]) -> Result<Vec<SnapshotId>, Status> {
    ids.iter()
        .map(|s| {
            SnapshotId::parse(s).map_err(|e| Status::invalid_argument(format!("snapshot_ids: {e}")))
        })
        .collect()
}

fn nodes_of(ids: &[SnapshotId]) -> Vec<String> {
    let set: BTreeSet<String> = ids.iter().map(|i| i.volume.node.clone()).collect();
    set.into_iter().collect()
}

#[tonic::async_trait]
impl csi::group_controller_server::GroupController for GroupController {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        use csi::group_controller_service_capability::{Rpc, Type};
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: Cap::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    #[tracing::instrument(skip_all, err, fields(name = %req.get_ref().name, volumes = ?req.get_ref().source_volume_ids))]
    async fn create_volume_group_snapshot(
        &self,
        req: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(status::missing("name"));
        }
        if r.source_volume_ids.is_empty() {
            return Err(status::missing("source_volume_ids"));
        }
        let p = GroupSnapshotParams::try_from(&r.parameters)?;
        let mut vols: Vec<VolumeId> = vec![];
        for s in &r.source_volume_ids {
            let v =
                VolumeId::parse(s).map_err(|e| Status::not_found(format!("source volume: {e}")))?;
            if vols.contains(&v) {
                return Err(Status::invalid_argument(format!(
                    "source_volume_ids names {v} twice"
                )));
            }
            vols.push(v);
        }
        let g = GroupId::of_name(&r.name);
        let _claim = self.claim(&r.name)?;
        let nodes: Vec<String> = vols
            .iter()
            .map(|v| v.node.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let existing = self.members(&g, &nodes).await?;
        if !existing.is_empty() {
            let have: BTreeSet<VolumeId> = existing.iter().map(Member::volume).collect();
            let want: BTreeSet<VolumeId> = vols.iter().cloned().collect();
            if have == want {
                // A retry: the group was taken already.
                return Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group_pb(&g, &existing)),
                }));
            }
            if !have.is_subset(&want) {
                let names: Vec<String> = have.iter().map(|v| v.to_string()).collect();
                return Err(Status::already_exists(format!(
                    "a group snapshot named {:?} exists ({g}) of other volumes: {}",
                    r.name,
                    names.join(", ")
                )));
            }
            // What an interrupted attempt left: not cut in one window with the missing
            // members, so it cannot be part of this group. Start again.
            tracing::warn!(group = %g, name = %r.name, found = existing.len(), "removing the members an interrupted attempt left, then taking the group again");
            self.remove(&existing).await?;
        }
        let (members, window) = self.take(&r.name, &g, &vols, p.freeze_timeout).await?;
        let mut resp = Response::new(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_pb(&g, &members)),
        });
        let md = resp.metadata_mut();
        md.insert(
            FREEZE_WINDOW_HEADER,
            (window.total.as_micros() as u64).into(),
        );
        md.insert("snapblk-frozen-max-us", window.frozen_max_us.into());
        Ok(resp)
    }

    #[tracing::instrument(skip_all, err, fields(group = %req.get_ref().group_snapshot_id))]
    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.group_snapshot_id.is_empty() {
            return Err(status::missing("group_snapshot_id"));
        }
        let listed = listed(&r.snapshot_ids)?;
        // An ID this driver did not make names nothing to delete.
        let Ok(g) = GroupId::parse(&r.group_snapshot_id) else {
            return Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}));
        };
        let members = self.members(&g, &nodes_of(&listed)).await?;
        self.check_listed(&g, &listed, &members, false).await?;
        self.remove(&members).await?;
        let ids: Vec<String> = members.iter().map(|m| m.id().to_string()).collect();
        tracing::info!(group = %g, snapshots = ?ids, "deleted group snapshot");
        Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.group_snapshot_id.is_empty() {
            return Err(status::missing("group_snapshot_id"));
        }
        let listed = listed(&r.snapshot_ids)?;
        let g =
            GroupId::parse(&r.group_snapshot_id).map_err(|e| Status::not_found(e.to_string()))?;
        let members = self.members(&g, &nodes_of(&listed)).await?;
        self.check_listed(&g, &listed, &members, true).await?;
        if members.is_empty() {
            return Err(Status::not_found(format!("no group snapshot {g}")));
        }
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_pb(&g, &members)),
        }))
    }
}
