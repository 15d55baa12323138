//! The CSI Node service: serves a volume as /dev/ublkbN while it is staged, with its file
//! system mounted on the staging path (made only on a device that holds none), and binds
//! it into pods. Every call is idempotent: the kubelet retries all of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::daemon::Daemons;
use super::ids::VolumeId;
use super::mounts;
use super::oplock::OpLocks;
use super::params::{self, Access, DEFAULT_FS};
use super::proto::csi::{self, node_service_capability::rpc::Type as Cap};
use super::status::{self, required};
use super::store::Store;
use crate::sys::mountinfo;

/// The Node service of one node.
pub struct Node {
    pub node_id: String,
    pub driver_name: String,
    /// Most volumes the kubelet may stage here (0: no limit).
    pub max_volumes: i64,
    pub store: Arc<Store>,
    pub daemons: Arc<Daemons>,
    pub ops: OpLocks,
}

/// The capabilities of the Node service.
pub const CAPABILITIES: [Cap; 5] = [
    Cap::StageUnstageVolume,
    Cap::GetVolumeStats,
    Cap::ExpandVolume,
    Cap::VolumeCondition,
    Cap::SingleNodeMultiWriter,
];

impl Node {
    /// The key of a volume of this node; NotFound for other nodes' volumes and foreign IDs.
    fn key(&self, volume_id: &str) -> Result<String, Status> {
        let id = VolumeId::parse(volume_id).map_err(|e| Status::not_found(e.to_string()))?;
        if id.node != self.node_id {
            return Err(Status::not_found(format!(
                "volume {volume_id} lives on node {}, not on {}",
                id.node, self.node_id
            )));
        }
        Ok(id.key)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Node) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let me = Node {
            node_id: self.node_id.clone(),
            driver_name: self.driver_name.clone(),
            max_volumes: self.max_volumes,
            store: self.store.clone(),
            daemons: self.daemons.clone(),
            ops: self.ops.clone(),
        };
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(status::join)?
    }

    fn stage(&self, key: &str, staging: &Path, access: &Access) -> Result<(), Status> {
        let entry = self.store.live(key)?;
        let staging_str = staging.to_string_lossy().into_owned();
        if let Some(s) = self.daemons.get(key) {
            if s.staging_path != staging_str {
                return Err(Status::already_exists(format!(
                    "volume {key} is staged at {}, not at {staging_str}",
                    s.staging_path
                )));
            }
        }
        let block = *access == Access::Block;
        let served = self.daemons.ensure(key, &staging_str, block)?;
        let Access::Mount { fs_type, flags } = access else {
            return Ok(());
        };
        let (major, minor) = mountinfo::device_number(Path::new(&served.device))
            .ok_or_else(|| Status::internal(format!("{} is not a block device", served.device)))?;
        match mountinfo::at(staging) {
            Ok(Some(m)) if (m.major, m.minor) == (major, minor) => return Ok(()),
            Ok(Some(m)) => {
                return Err(Status::already_exists(format!(
                    "{} already has another file system mounted ({} from {})",
                    staging.display(),
                    m.fstype,
                    m.source
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(status::io("reading mountinfo", e)),
        }
        let fs = [fs_type.as_str(), entry.record.fs_type.as_str()]
            .into_iter()
            .find(|f| !f.is_empty())
            .unwrap_or(DEFAULT_FS)
            .to_string();
        match mounts::signature(&served.device)? {
            None => {
                tracing::info!(volume = key, device = %served.device, fs, "making a file system on the new volume");
                mounts::mkfs(&fs, &served.device)?;
            }
            Some(found) if found == fs => {}
            Some(found) => {
                return Err(Status::failed_precondition(format!(
                "volume {key} holds {found}, not {fs}: it is never formatted again (it holds data)"
            )))
            }
        }
        std::fs::create_dir_all(staging)
            .map_err(|e| status::io(&format!("creating {}", staging.display()), e))?;
        mounts::mount_fs(&served.device, staging, &fs, flags)?;
        tracing::info!(volume = key, device = %served.device, staging = %staging.display(), fs, "volume staged");
        Ok(())
    }

    fn unstage(&self, key: &str, staging: &Path) -> Result<(), Status> {
        mounts::unmount_all(staging)?;
        if let Some(s) = self.daemons.get(key) {
            if let Some((major, minor)) = mountinfo::device_number(Path::new(&s.device)) {
                let still = mountinfo::of_device(major, minor).unwrap_or_default();
                if let Some(m) = still.first() {
                    return Err(Status::failed_precondition(format!(
                        "{} is still mounted at {}: unpublish it first",
                        s.device,
                        m.mount_point.display()
                    )));
                }
            }
        }
        self.daemons.stop(key)?;
        tracing::info!(volume = key, staging = %staging.display(), "volume unstaged");
        Ok(())
    }

    fn publish(
        &self,
        key: &str,
        staging: &Path,
        target: &Path,
        access: &Access,
        readonly: bool,
    ) -> Result<(), Status> {
        let served = self.daemons.get(key).ok_or_else(|| {
            Status::failed_precondition(format!("volume {key} is not staged on this node"))
        })?;
        if served.staging_path != staging.to_string_lossy() {
            return Err(Status::failed_precondition(format!(
                "volume {key} is staged at {}, not at {}",
                served.staging_path,
                staging.display()
            )));
        }
        let (block, source) = match access {
            Access::Block => (true, PathBuf::from(&served.device)),
            Access::Mount { .. } => (false, staging.to_path_buf()),
        };
        if block != served.block {
            return Err(Status::invalid_argument(format!(
                "volume {key} is staged for {} access",
                if served.block { "block" } else { "file system" }
            )));
        }
        if let Ok(Some(m)) = mountinfo::at(target) {
            let same = if block {
                m.root.file_name() == source.file_name()
            } else {
                mountinfo::device_number(Path::new(&served.device)) == Some((m.major, m.minor))
            };
            if same {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} already has something else mounted ({})",
                target.display(),
                m.source
            )));
        }
        let made = if block {
            target
                .parent()
                .map(std::fs::create_dir_all)
                .transpose()
                .and_then(|_| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(target)
                        .map(|_| ())
                })
        } else {
            std::fs::create_dir_all(target)
        };
        made.map_err(|e| status::io(&format!("creating {}", target.display()), e))?;
        mounts::bind(&source, target, readonly)?;
        tracing::info!(volume = key, target = %target.display(), readonly, block, "volume published");
        Ok(())
    }

    fn unpublish(&self, target: &Path) -> Result<(), Status> {
        mounts::unmount_all(target)?;
        let removed = match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(_) => std::fs::remove_file(target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        removed.map_err(|e| status::io(&format!("removing {}", target.display()), e))
    }

    fn stats(&self, key: &str, path: &Path) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
        let entry = self.store.live(key)?;
        let md = std::fs::metadata(path).map_err(|_| {
            Status::not_found(format!("{} does not exist on this node", path.display()))
        })?;
        let served = self
            .daemons
            .get(key)
            .ok_or_else(|| Status::not_found(format!("volume {key} is not staged on this node")))?;
        let condition = match self.daemons.check(key) {
            Ok(()) => csi::VolumeCondition {
                abnormal: false,
                message: format!("served as {}", served.device),
            },
            Err(why) => csi::VolumeCondition {
                abnormal: true,
                message: why,
            },
        };
        use csi::volume_usage::Unit;
        let usage = if md.is_dir() {
            let m = mountinfo::at(path).map_err(|e| status::io("reading mountinfo", e))?;
            if m.is_none() {
                return Err(Status::not_found(format!(
                    "{} is not where volume {key} is mounted",
                    path.display()
                )));
            }
            let st = nix::sys::statvfs::statvfs(path)
                .map_err(|e| status::io(&format!("statvfs {}", path.display()), e.into()))?;
            let f = st.fragment_size() as i64;
            vec![
                csi::VolumeUsage {
                    available: st.blocks_available() as i64 * f,
                    total: st.blocks() as i64 * f,
                    used: (st.blocks() as i64 - st.blocks_free() as i64) * f,
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: st.files_available() as i64,
                    total: st.files() as i64,
                    used: st.files() as i64 - st.files_free() as i64,
                    unit: Unit::Inodes as i32,
                },
            ]
        } else {
            vec![csi::VolumeUsage {
                available: 0,
                total: entry.summary.size as i64,
                used: 0,
                unit: Unit::Bytes as i32,
            }]
        };
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    fn expand(&self, key: &str, path: &Path) -> Result<i64, Status> {
        let entry = self.store.live(key)?;
        if !path.exists() {
            return Err(Status::not_found(format!(
                "{} does not exist on this node",
                path.display()
            )));
        }
        let served = self.daemons.get(key).ok_or_else(|| {
            Status::failed_precondition(format!("volume {key} is not staged on this node"))
        })?;
        if served.block {
            return Ok(entry.summary.size as i64);
        }
        let dev_size = mounts::device_size(&served.device)?;
        if dev_size < entry.summary.size {
            return Err(Status::failed_precondition(format!(
                "{} shows {dev_size} bytes but the volume has {}: the running kernel cannot grow a served ublk device (UBLK_F_UPDATE_SIZE needs Linux 6.16+); unstage and stage the volume again to use the new size",
                served.device, entry.summary.size
            )));
        }
        let fs = mounts::signature(&served.device)?.unwrap_or_default();
        mounts::grow_fs(&fs, &served.device, Path::new(&served.staging_path))?;
        tracing::info!(volume = key, size = dev_size, fs, "file system grown");
        Ok(dev_size as i64)
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| status::missing("volume_capability"))?;
        let access = params::access(cap)?;
        let key = self.key(&r.volume_id)?;
        let guard = self.ops.claim(&key, "stage")?;
        self.blocking(move |n| {
            let _guard = guard;
            n.stage(&key, &staging, &access)
        })
        .await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let key = self.key(&r.volume_id)?;
        let guard = self.ops.claim(&key, "unstage")?;
        self.blocking(move |n| {
            let _guard = guard;
            n.unstage(&key, &staging)
        })
        .await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_id))]
    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| status::missing("volume_capability"))?;
        let access = params::access(cap)?;
        let staging = PathBuf::from(required(
            &r.staging_target_path,
            "staging_target_path (this driver stages volumes)",
        )?);
        let key = self.key(&r.volume_id)?;
        let guard = self.ops.claim(&key, "publish")?;
        let readonly = r.readonly;
        self.blocking(move |n| {
            let _guard = guard;
            n.publish(&key, &staging, &target, &access, readonly)
        })
        .await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_id))]
    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let key = self.key(&r.volume_id)?;
        let guard = self.ops.claim(&key, "unpublish")?;
        self.blocking(move |n| {
            let _guard = guard;
            n.unpublish(&target)
        })
        .await?;
        tracing::info!(volume = %r.volume_id, target = %r.target_path, "volume unpublished");
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let key = self.key(&r.volume_id)?;
        let stats = self.blocking(move |n| n.stats(&key, &path)).await?;
        Ok(Response::new(stats))
    }

    #[tracing::instrument(skip_all, err, fields(volume = %req.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        if let Some(c) = &r.volume_capability {
            params::access(c)?;
        }
        let key = self.key(&r.volume_id)?;
        let guard = self.ops.claim(&key, "expand")?;
        let capacity_bytes = self
            .blocking(move |n| {
                let _guard = guard;
                n.expand(&key, &path)
            })
            .await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type};
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: CAPABILITIES
                .iter()
                .map(|c| csi::NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: *c as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(
                    super::controller::topology_key(&self.driver_name),
                    self.node_id.clone(),
                )]),
            }),
        }))
    }
}
