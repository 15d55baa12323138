//! The volumes of one node: folders under `<state>/volumes/<key>`, each an engine volume
//! plus `csi.json`, the record of what Kubernetes asked for (its name, file system, source,
//! and whether it was deleted while snapshots still need its layers).
//!
//! Every change goes to the engine directly when no daemon serves the volume, and through
//! the daemon's control socket when one does (the daemon holds the volume's lock), so
//! snapshots, restores and clones work whether or not the volume is staged right now.
//! Listing reads only manifests, which needs neither.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Status;

use super::daemon::{Daemons, Layout};
use super::ids::{is_plain_name, MAX_KEY_LEN};
use super::oplock::OpLocks;
use super::proto::node as pb;
use super::status;
use crate::ctl::client::Client;
use crate::ctl::protocol::{self as ctlp, Command as CtlCommand, FreezeMode};
use crate::engine::{self, validate_snapshot_name, CreateOptions, Volume, VolumeSummary};

/// The record's file in a volume folder.
const RECORD: &str = "csi.json";
/// Version of the record's format.
const RECORD_VERSION: u32 = 1;

/// What Kubernetes asked for when it created the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub version: u32,
    /// The CreateVolume name.
    pub name: String,
    /// File system to make at the first stage ("" when made for block access).
    pub fs_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Deleted by the CO; the folder stays for the snapshots that still need its layers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// Where a volume's first content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    Snapshot {
        volume_key: String,
        snapshot_id: u64,
    },
    Volume {
        volume_key: String,
    },
}

/// One volume folder as found on disk.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub record: Record,
    pub summary: VolumeSummary,
}

/// The node's volumes.
pub struct Store {
    layout: Layout,
    daemons: Arc<Daemons>,
    ops: OpLocks,
    /// Creations of volumes and snapshots, one at a time: names are checked across all
    /// volumes of the node before anything is made.
    naming: Mutex<()>,
    /// Freezes held for the controller (group snapshots), by handle.
    freezes: Mutex<HashMap<String, Held>>,
}

/// A freeze held for the controller: the daemon thaws when this connection closes.
struct Held {
    key: String,
    client: Client,
    mounts: Vec<String>,
    frozen_at: Instant,
    deadline: Instant,
}

/// The engine's snapshot name for a CO's snapshot name: the same when it is a valid
/// engine name, else a digest of it (still unique and stable, so retries find it).
pub fn engine_snapshot_name(name: &str) -> String {
    if validate_snapshot_name(name).is_ok() {
        return name.to_string();
    }
    format!("h-{}", &hex(&Sha256::digest(name.as_bytes()))[..40])
}

impl Store {
    /// Opens the store, creating its folders, and removes what an interrupted creation or
    /// removal left behind.
    pub fn open(layout: Layout, daemons: Arc<Daemons>, ops: OpLocks) -> Result<Store, Status> {
        layout
            .create()
            .map_err(|e| status::io(&format!("creating {}", layout.volumes.display()), e))?;
        if let Ok(entries) = fs::read_dir(&layout.volumes) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.')
                    && (name.ends_with(".creating") || name.ends_with(".removing"))
                {
                    tracing::info!(folder = %e.path().display(), "removing what an interrupted volume creation or removal left");
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(Store {
            layout,
            daemons,
            ops,
            naming: Mutex::new(()),
            freezes: Mutex::default(),
        })
    }

    /// The folder of volume `key`.
    pub fn dir(&self, key: &str) -> PathBuf {
        self.layout.volumes.join(key)
    }

    /// Every volume folder of the node (deleted ones kept for their snapshots included),
    /// in key order. Folders that cannot be read are logged and skipped.
    pub fn entries(&self) -> Vec<Entry> {
        let mut keys: Vec<String> = match fs::read_dir(&self.layout.volumes) {
            Ok(it) => it
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_plain_name(n, MAX_KEY_LEN))
                .collect(),
            Err(e) => {
                tracing::error!(folder = %self.layout.volumes.display(), error = %e, "cannot list volumes");
                vec![]
            }
        };
        keys.sort();
        keys.into_iter()
            .filter_map(|k| match self.entry(&k) {
                Ok(e) => Some(e),
                Err(s) => {
                    tracing::warn!(volume = %k, error = %s.message(), "skipping a volume folder that cannot be read");
                    None
                }
            })
            .collect()
    }

    /// Volume `key` (NotFound when there is none).
    pub fn entry(&self, key: &str) -> Result<Entry, Status> {
        if !is_plain_name(key, MAX_KEY_LEN) {
            return Err(Status::not_found(format!("no volume {key:?} on this node")));
        }
        let dir = self.dir(key);
        let record = read_record(&dir)?;
        let summary =
            engine::summary(&dir).map_err(|e| status::engine(&format!("volume {key}"), e))?;
        Ok(Entry {
            key: key.to_string(),
            record,
            summary,
        })
    }

    /// A live (not deleted) volume, or NotFound.
    pub fn live(&self, key: &str) -> Result<Entry, Status> {
        match self.entry(key) {
            Ok(e) if !e.record.deleted => Ok(e),
            Ok(_) => Err(Status::not_found(format!("volume {key} was deleted"))),
            Err(e) => Err(e),
        }
    }

    /// The proto form of a volume.
    pub fn volume(&self, e: &Entry) -> pb::Volume {
        pb::Volume {
            key: e.key.clone(),
            name: e.record.name.clone(),
            capacity_bytes: e.summary.size,
            block_size: e.summary.block_size,
            fs_type: e.record.fs_type.clone(),
            source: e.record.source.as_ref().map(|s| pb::VolumeSource {
                kind: Some(match s {
                    Source::Snapshot {
                        volume_key,
                        snapshot_id,
                    } => pb::volume_source::Kind::Snapshot(pb::SnapshotRef {
                        volume_key: volume_key.clone(),
                        snapshot_id: *snapshot_id,
                    }),
                    Source::Volume { volume_key } => {
                        pb::volume_source::Kind::VolumeKey(volume_key.clone())
                    }
                }),
            }),
            created_unix_ms: e.summary.created_unix_ms,
            staged: self.daemons.get(&e.key).is_some(),
        }
    }

    /// Creates a volume, or returns the one this name already made if it matches.
    pub fn create(&self, req: &pb::CreateVolumeRequest) -> Result<pb::Volume, Status> {
        let source = source_of(req.source.as_ref())?;
        if req.name.is_empty() {
            return Err(status::missing("name"));
        }
        if !matches!(req.block_size, 512 | 4096) {
            return Err(Status::invalid_argument(format!(
                "block size {} is not supported: use 4096 or 512",
                req.block_size
            )));
        }
        let _naming = self.naming.lock();
        if let Some(e) = self
            .entries()
            .into_iter()
            .find(|e| e.record.name == req.name)
        {
            return self.existing(e, req, &source);
        }
        let key = self.new_key();
        let _guard = self.ops.claim(&key, "create")?;
        // The source is busy for the length of the copy-free clone.
        let _src_guard = match &source {
            Some(Source::Snapshot { volume_key, .. }) | Some(Source::Volume { volume_key }) => {
                Some(self.ops.claim(volume_key, "a restore or clone from it")?)
            }
            None => None,
        };
        let tmp = self.layout.volumes.join(format!(".{key}.creating"));
        let made = self.make(&key, &tmp, req, &source);
        if let Err(e) = made {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dir = self.dir(&key);
        fs::rename(&tmp, &dir)
            .and_then(|()| File::open(&self.layout.volumes)?.sync_all())
            .map_err(|e| status::io(&format!("creating {}", dir.display()), e))?;
        let entry = self.entry(&key)?;
        tracing::info!(volume = %key, name = %req.name, size = entry.summary.size, source = ?source, "created volume");
        Ok(self.volume(&entry))
    }

    fn existing(
        &self,
        e: Entry,
        req: &pb::CreateVolumeRequest,
        source: &Option<Source>,
    ) -> Result<pb::Volume, Status> {
        let conflict = if e.record.deleted {
            Some("it was deleted (its snapshots remain)".to_string())
        } else if e.summary.size != req.capacity_bytes {
            Some(format!(
                "it has {} bytes, this request asks for {}",
                e.summary.size, req.capacity_bytes
            ))
        } else if e.summary.block_size != req.block_size {
            Some(format!("it has {}-byte blocks", e.summary.block_size))
        } else if &e.record.source != source {
            Some("it was made from another source".to_string())
        } else if e.record.fs_type != req.fs_type {
            Some(format!("it is for file system {:?}", e.record.fs_type))
        } else {
            None
        };
        match conflict {
            Some(why) => Err(Status::already_exists(format!(
                "a volume named {:?} exists ({}) and does not match: {why}",
                req.name, e.key
            ))),
            None => Ok(self.volume(&e)),
        }
    }

    /// Fills the new volume's folder `tmp`.
    fn make(
        &self,
        key: &str,
        tmp: &Path,
        req: &pb::CreateVolumeRequest,
        source: &Option<Source>,
    ) -> Result<(), Status> {
        let ctx = format!("creating volume {key} ({})", req.name);
        match source {
            None => {
                let v = Volume::create(
                    tmp,
                    &CreateOptions {
                        size: req.capacity_bytes,
                        block_size: req.block_size,
                    },
                )
                .map_err(|e| status::engine(&ctx, e))?;
                v.close().map_err(|e| status::engine(&ctx, e))?;
            }
            Some(Source::Snapshot {
                volume_key,
                snapshot_id,
            }) => {
                let src = self.entry(volume_key).map_err(|_| {
                    Status::not_found(format!(
                        "source snapshot: no volume {volume_key} on this node"
                    ))
                })?;
                let snap = src
                    .summary
                    .snapshots
                    .iter()
                    .find(|s| s.id == *snapshot_id)
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "volume {volume_key} has no snapshot {snapshot_id}"
                        ))
                    })?;
                self.check_fits(snap.size, req)?;
                self.clone_snapshot(volume_key, &snap.name, tmp)?;
            }
            Some(Source::Volume { volume_key }) => {
                let src = self.live(volume_key).map_err(|_| {
                    Status::not_found(format!(
                        "source volume: no volume {volume_key} on this node"
                    ))
                })?;
                self.check_fits(src.summary.size, req)?;
                // A clone is a restore of a snapshot taken for it and dropped after: the
                // clone keeps the layers it needs through its own hard links.
                let name = format!("clone-for-{key}");
                self.cut(volume_key, &name, FreezeMode::None, None)?;
                let cloned = self.clone_snapshot(volume_key, &name, tmp);
                if let Err(e) = self.drop_snapshot(volume_key, &name) {
                    tracing::warn!(volume = %volume_key, snapshot = %name, error = %e.message(), "could not remove the snapshot taken for a clone; delete it by hand");
                }
                cloned?;
            }
        }
        if source.is_some() {
            self.grow_unserved(tmp, req.capacity_bytes, &ctx)?;
        }
        write_record(
            tmp,
            &Record {
                version: RECORD_VERSION,
                name: req.name.clone(),
                fs_type: req.fs_type.clone(),
                source: source.clone(),
                deleted: false,
            },
        )
    }

    fn check_fits(&self, source_size: u64, req: &pb::CreateVolumeRequest) -> Result<(), Status> {
        if req.capacity_bytes < source_size {
            return Err(Status::out_of_range(format!(
                "the source holds {source_size} bytes; a volume of {} bytes cannot hold it",
                req.capacity_bytes
            )));
        }
        Ok(())
    }

    /// Grows the (unserved) volume in `dir` to `size` when it is smaller.
    fn grow_unserved(&self, dir: &Path, size: u64, ctx: &str) -> Result<(), Status> {
        let v = Volume::open(dir).map_err(|e| status::engine(ctx, e))?;
        if v.size() < size {
            v.resize(size).map_err(|e| status::engine(ctx, e))?;
        }
        v.close().map_err(|e| status::engine(ctx, e))
    }

    /// Makes `new_dir` a clone of snapshot `name` of volume `key`.
    fn clone_snapshot(&self, key: &str, name: &str, new_dir: &Path) -> Result<(), Status> {
        let ctx = format!("restoring snapshot {name} of volume {key}");
        if let Some(s) = self.daemons.get(key) {
            let dir = new_dir.to_string_lossy().into_owned();
            ctl_call(
                &s.socket,
                CtlCommand::SnapshotClone(ctlp::CloneArgs {
                    name: name.to_string(),
                    dir,
                }),
                &ctx,
            )?;
            return Ok(());
        }
        let v = Volume::open(&self.dir(key)).map_err(|e| status::engine(&ctx, e))?;
        let c = v
            .clone_snapshot(name, new_dir)
            .map_err(|e| status::engine(&ctx, e))?;
        c.close().map_err(|e| status::engine(&ctx, e))?;
        v.close().map_err(|e| status::engine(&ctx, e))
    }

    /// Deletes volume `key`. With snapshots left, only its head goes (discarded, so its
    /// space is given back) and the folder stays, marked deleted, until the last snapshot
    /// is deleted.
    pub fn delete(&self, key: &str) -> Result<(), Status> {
        let _guard = self.ops.claim(key, "delete")?;
        let e = match self.entry(key) {
            Ok(e) => e,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(s),
        };
        if e.record.deleted {
            return Ok(());
        }
        if let Some(s) = self.daemons.get(key) {
            return Err(Status::failed_precondition(format!(
                "volume {key} is staged at {} (served as {}): unstage it before deleting it",
                s.staging_path, s.device
            )));
        }
        let dir = self.dir(key);
        let ctx = format!("deleting volume {key}");
        if e.summary.snapshots.is_empty() {
            engine::destroy(&dir).map_err(|err| status::engine(&ctx, err))?;
            tracing::info!(volume = %key, name = %e.record.name, "deleted volume");
            return Ok(());
        }
        let v = Volume::open(&dir).map_err(|err| status::engine(&ctx, err))?;
        v.discard(0, v.size())
            .and_then(|()| v.close())
            .map_err(|err| status::engine(&ctx, err))?;
        write_record(
            &dir,
            &Record {
                deleted: true,
                ..e.record
            },
        )?;
        tracing::info!(volume = %key, snapshots = e.summary.snapshots.len(), "deleted volume; its folder stays until its last snapshot is deleted");
        Ok(())
    }

    /// Grows volume `key` to `size` bytes (online when staged). Returns the new size and
    /// whether the volume is staged with a file system (which then needs growing too).
    pub fn expand(&self, key: &str, size: u64) -> Result<(u64, bool), Status> {
        let _guard = self.ops.claim(key, "expand")?;
        let e = self.live(key)?;
        let served = self.daemons.get(key);
        let fs_staged = served.as_ref().is_some_and(|s| !s.block);
        if size <= e.summary.size {
            return Ok((e.summary.size, fs_staged));
        }
        let ctx = format!("growing volume {key} to {size} bytes");
        match served {
            Some(s) => {
                ctl_call(
                    &s.socket,
                    CtlCommand::VolumeResize(ctlp::ResizeArgs { size }),
                    &ctx,
                )?;
            }
            None => self.grow_unserved(&self.dir(key), size, &ctx)?,
        }
        tracing::info!(volume = %key, from = e.summary.size, to = size, online = fs_staged, "grew volume");
        Ok((size, fs_staged))
    }

    /// Takes snapshot `name` of volume `key`, or returns it if this name already did.
    pub fn snapshot(&self, req: &pb::CreateSnapshotRequest) -> Result<pb::Snapshot, Status> {
        if req.name.is_empty() {
            return Err(status::missing("name"));
        }
        let ename = engine_snapshot_name(&req.name);
        let _naming = self.naming.lock();
        for e in self.entries() {
            if let Some(s) = e.summary.snapshots.iter().find(|s| s.name == ename) {
                if e.key == req.volume_key {
                    return Ok(snapshot_pb(&e.key, &req.name, s, &Cut::default()));
                }
                return Err(Status::already_exists(format!(
                    "a snapshot named {:?} exists, of another volume ({})",
                    req.name, e.key
                )));
            }
        }
        let _guard = self.ops.claim(&req.volume_key, "snapshot")?;
        self.live(&req.volume_key)?;
        let freeze = match pb::FreezeMode::try_from(req.freeze) {
            Ok(pb::FreezeMode::FreezeNone) => FreezeMode::None,
            _ => FreezeMode::Auto,
        };
        let timeout = (req.freeze_timeout_ms > 0).then_some(req.freeze_timeout_ms);
        let cut = self.cut(&req.volume_key, &ename, freeze, timeout)?;
        let e = self.entry(&req.volume_key)?;
        let s = e
            .summary
            .snapshots
            .iter()
            .find(|s| s.name == ename)
            .ok_or_else(|| Status::internal(format!("snapshot {ename} vanished after its cut")))?;
        tracing::info!(volume = %req.volume_key, snapshot = %ename, id = s.id, consistency = cut.consistency, freeze_us = cut.freeze_us, frozen_us = cut.frozen_us, "took snapshot");
        Ok(snapshot_pb(&e.key, &req.name, s, &cut))
    }

    /// Freezes the file system of volume `key` for at most `timeout`, holding the
    /// daemon's control connection until [`Store::thaw`] or [`Store::expire`]. Nothing to
    /// freeze (not staged, or staged for block access): no handle.
    pub fn freeze(
        &self,
        key: &str,
        timeout: Duration,
        reason: &str,
    ) -> Result<pb::FreezeVolumeResponse, Status> {
        self.live(key)?;
        let Some(s) = self.daemons.get(key) else {
            tracing::info!(volume = %key, reason, "not staged: nothing to freeze, its cut is crash-consistent (nothing writes to it)");
            return Ok(pb::FreezeVolumeResponse::default());
        };
        if s.block {
            tracing::info!(volume = %key, reason, "staged for block access: no file system to freeze, its cut is crash-consistent");
            return Ok(pb::FreezeVolumeResponse {
                staged: true,
                ..Default::default()
            });
        }
        let ctx = format!("freezing volume {key}");
        let mut client = Client::connect(&s.socket).map_err(|e| status::ctl(&ctx, e))?;
        let t0 = Instant::now();
        let r = client.call(CtlCommand::Freeze(ctlp::FreezeArgs {
            mount: None,
            timeout_ms: Some(timeout.as_millis().max(1) as u64),
        }));
        let frozen_at = Instant::now();
        let reply = match r {
            Ok(v) => v,
            // Staged, but its file system is not mounted (any more): nothing to freeze.
            Err(e) if e.code == ctlp::ErrorCode::NotFound => {
                tracing::info!(volume = %key, reason, why = %e.message, "no mounted file system to freeze: its cut is crash-consistent");
                return Ok(pb::FreezeVolumeResponse {
                    staged: true,
                    ..Default::default()
                });
            }
            Err(e) => return Err(status::ctl(&ctx, e)),
        };
        let mounts = strings(&reply, "frozen");
        let handle = hex(&random_bytes());
        let freeze_us = (frozen_at - t0).as_micros() as u64;
        tracing::info!(volume = %key, reason, handle, mounts = ?mounts, freeze_us, timeout_ms = timeout.as_millis() as u64, "froze the file system; held until thawed or the deadline");
        self.freezes.lock().insert(
            handle.clone(),
            Held {
                key: key.to_string(),
                client,
                mounts: mounts.clone(),
                frozen_at,
                deadline: t0 + timeout,
            },
        );
        Ok(pb::FreezeVolumeResponse {
            handle,
            frozen_mounts: mounts,
            freeze_us,
            staged: true,
        })
    }

    /// Thaws the freeze `handle` made. A handle no longer held had expired.
    pub fn thaw(&self, handle: &str) -> Result<pb::ThawVolumeResponse, Status> {
        let Some(mut h) = self.freezes.lock().remove(handle) else {
            return Ok(pb::ThawVolumeResponse {
                expired: true,
                ..Default::default()
            });
        };
        let expired = Instant::now() >= h.deadline;
        let r = h.client.call(CtlCommand::Thaw(ctlp::FreezeArgs::default()));
        let frozen_us = h.frozen_at.elapsed().as_micros() as u64;
        // Closing the connection thaws too, whatever the reply.
        drop(h.client);
        let reply = r.map_err(|e| status::ctl(&format!("thawing volume {}", h.key), e))?;
        let thawed = strings(&reply, "thawed");
        tracing::info!(volume = %h.key, handle, frozen_us, expired, "thawed the file system");
        Ok(pb::ThawVolumeResponse {
            thawed_mounts: if thawed.is_empty() { h.mounts } else { thawed },
            frozen_us,
            expired,
        })
    }

    /// Ends freeze `handle` at its deadline if it is still held: closing the daemon's
    /// connection makes the daemon thaw.
    pub fn expire(&self, handle: &str) {
        let held = self.freezes.lock().remove(handle);
        if let Some(h) = held {
            tracing::warn!(volume = %h.key, handle, frozen_ms = h.frozen_at.elapsed().as_millis() as u64, "a freeze reached its deadline without a thaw: released (the daemon thaws)");
        }
    }

    /// Cuts snapshot `name` of volume `key`.
    fn cut(
        &self,
        key: &str,
        name: &str,
        freeze: FreezeMode,
        freeze_timeout_ms: Option<u64>,
    ) -> Result<Cut, Status> {
        let ctx = format!("snapshot {name} of volume {key}");
        if let Some(s) = self.daemons.get(key) {
            let r = ctl_call(
                &s.socket,
                CtlCommand::SnapshotCreate(ctlp::SnapshotCreateArgs {
                    name: name.to_string(),
                    freeze,
                    mount: None,
                    freeze_timeout_ms,
                }),
                &ctx,
            )?;
            // A cut inside a freeze held for a group snapshot freezes nothing itself,
            // and the daemon says the cut was application-consistent.
            let frozen = r
                .get("frozen_mounts")
                .and_then(|m| m.as_array())
                .is_some_and(|m| !m.is_empty())
                || r.get("consistency")
                    .and_then(|c| c.as_str())
                    .is_some_and(|c| c.starts_with("application"));
            let us = |field: &str| {
                r.get(field)
                    .and_then(|v| v.as_f64())
                    .map_or(0, |ms| (ms * 1000.0).round() as u64)
            };
            return Ok(if frozen {
                Cut {
                    consistency: "application",
                    freeze_us: us("freeze_ms"),
                    frozen_us: us("frozen_ms"),
                }
            } else {
                CRASH_CONSISTENT
            });
        }
        let v = Volume::open(&self.dir(key)).map_err(|e| status::engine(&ctx, e))?;
        v.create_snapshot(name)
            .and_then(|_| v.close())
            .map_err(|e| status::engine(&ctx, e))?;
        Ok(CRASH_CONSISTENT)
    }

    /// Deletes snapshot `id` of volume `key` (nothing to do when it is gone), and the
    /// volume's folder with it when the volume was deleted and this was its last snapshot.
    pub fn delete_snapshot(&self, key: &str, id: u64) -> Result<(), Status> {
        let _guard = self.ops.claim(key, "snapshot delete")?;
        let e = match self.entry(key) {
            Ok(e) => e,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(s),
        };
        let Some(s) = e.summary.snapshots.iter().find(|s| s.id == id) else {
            return Ok(());
        };
        self.drop_snapshot(key, &s.name)?;
        tracing::info!(volume = %key, snapshot = %s.name, id, "deleted snapshot");
        if e.record.deleted && e.summary.snapshots.len() == 1 {
            engine::destroy(&self.dir(key))
                .map_err(|err| status::engine(&format!("removing deleted volume {key}"), err))?;
            tracing::info!(volume = %key, "removed the folder of a deleted volume: its last snapshot is gone");
        }
        Ok(())
    }

    fn drop_snapshot(&self, key: &str, name: &str) -> Result<(), Status> {
        let ctx = format!("deleting snapshot {name} of volume {key}");
        if let Some(s) = self.daemons.get(key) {
            ctl_call(
                &s.socket,
                CtlCommand::SnapshotDelete(ctlp::NameArgs {
                    name: name.to_string(),
                }),
                &ctx,
            )?;
            return Ok(());
        }
        let v = Volume::open(&self.dir(key)).map_err(|e| status::engine(&ctx, e))?;
        v.delete_snapshot(name)
            .and_then(|()| v.close())
            .map_err(|e| status::engine(&ctx, e))
    }

    /// The node's snapshots (of deleted volumes too), filtered as asked.
    pub fn snapshots(&self, req: &pb::ListSnapshotsRequest) -> Vec<pb::Snapshot> {
        let ename = (!req.name.is_empty()).then(|| engine_snapshot_name(&req.name));
        self.entries()
            .into_iter()
            .filter(|e| req.volume_key.is_empty() || e.key == req.volume_key)
            .flat_map(|e| {
                e.summary
                    .snapshots
                    .iter()
                    .filter(|s| req.id == 0 || s.id == req.id)
                    .filter(|s| ename.as_ref().is_none_or(|n| &s.name == n))
                    .map(|s| snapshot_pb(&e.key, &s.name, s, &Cut::default()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The ranges of snapshot `id` of volume `key` that hold data (deleted volumes'
    /// snapshots included). Read from the volume's files, served or not.
    pub fn allocated_runs(&self, key: &str, id: u64) -> Result<engine::BlockRuns, Status> {
        let e = self.entry(key)?;
        engine::allocated_runs(&self.dir(&e.key), id)
            .map_err(|err| status::engine(&format!("volume {key}"), err))
    }

    /// The ranges changed from snapshot `base` to snapshot `target`: of one volume, or the
    /// target's volume restored or cloned (at any depth) from the base's after the base.
    pub fn changed_runs(
        &self,
        base: &pb::SnapshotRef,
        target: &pb::SnapshotRef,
    ) -> Result<engine::BlockRuns, Status> {
        let ctx = format!(
            "changes from snapshot {} of volume {} to snapshot {} of volume {}",
            base.snapshot_id, base.volume_key, target.snapshot_id, target.volume_key
        );
        let t = self.entry(&target.volume_key)?;
        let b = self.entry(&base.volume_key).map_err(|e| {
            if e.code() == tonic::Code::NotFound {
                Status::not_found(format!(
                    "{ctx}: the base's volume is gone with all its snapshots; take a full backup"
                ))
            } else {
                e
            }
        })?;
        engine::changed_runs(
            &self.dir(&b.key),
            base.snapshot_id,
            &self.dir(&t.key),
            target.snapshot_id,
        )
        .map_err(|err| {
            // What a backup tool must hear to fall back to a full copy.
            let full = matches!(err, engine::EngineError::Unrelated(_))
                || matches!(err, engine::EngineError::SnapshotIdNotFound(n) if n == base.snapshot_id);
            let st = status::engine(&ctx, err);
            if full {
                Status::new(st.code(), format!("{}; take a full backup", st.message()))
            } else {
                st
            }
        })
    }

    /// The node's live volumes, optionally only the one of a CreateVolume name.
    pub fn volumes(&self, name: &str) -> Vec<pb::Volume> {
        self.entries()
            .iter()
            .filter(|e| !e.record.deleted && (name.is_empty() || e.record.name == name))
            .map(|e| self.volume(e))
            .collect()
    }

    /// Space of the file system under the volume folders.
    pub fn capacity(&self) -> Result<pb::Capacity, Status> {
        let st = nix::sys::statvfs::statvfs(&self.layout.volumes).map_err(|e| {
            status::io(
                &format!("statvfs {}", self.layout.volumes.display()),
                e.into(),
            )
        })?;
        let frag = st.fragment_size() as u64;
        Ok(pb::Capacity {
            total_bytes: st.blocks() as u64 * frag,
            available_bytes: st.blocks_available() as u64 * frag,
            provisioned_bytes: self
                .entries()
                .iter()
                .filter(|e| !e.record.deleted)
                .map(|e| e.summary.size)
                .sum(),
        })
    }

    fn new_key(&self) -> String {
        loop {
            let key = hex(&random_bytes());
            if !self.dir(&key).exists() {
                return key;
            }
        }
    }
}

fn source_of(s: Option<&pb::VolumeSource>) -> Result<Option<Source>, Status> {
    Ok(match s.and_then(|s| s.kind.as_ref()) {
        None => None,
        Some(pb::volume_source::Kind::Snapshot(r)) => Some(Source::Snapshot {
            volume_key: r.volume_key.clone(),
            snapshot_id: r.snapshot_id,
        }),
        Some(pb::volume_source::Kind::VolumeKey(k)) => Some(Source::Volume {
            volume_key: k.clone(),
        }),
    })
}

/// How a snapshot was cut.
#[derive(Default)]
struct Cut {
    /// "application" (a file system was frozen), "crash", or "" when not known (a
    /// snapshot listed, or found again by a retried CreateSnapshot).
    consistency: &'static str,
    freeze_us: u64,
    frozen_us: u64,
}

/// A cut with no file system frozen.
const CRASH_CONSISTENT: Cut = Cut {
    consistency: "crash",
    freeze_us: 0,
    frozen_us: 0,
};

fn snapshot_pb(key: &str, name: &str, s: &engine::SnapshotSummary, cut: &Cut) -> pb::Snapshot {
    pb::Snapshot {
        volume_key: key.to_string(),
        id: s.id,
        name: name.to_string(),
        size_bytes: s.size,
        created_unix_ms: s.created_unix_ms,
        consistency: cut.consistency.to_string(),
        freeze_us: cut.freeze_us,
        frozen_us: cut.frozen_us,
    }
}

/// Sends one command to a volume daemon.
fn ctl_call(socket: &Path, cmd: CtlCommand, ctx: &str) -> Result<serde_json::Value, Status> {
    let mut c = Client::connect(socket).map_err(|e| status::ctl(ctx, e))?;
    c.call(cmd).map_err(|e| status::ctl(ctx, e))
}

fn read_record(dir: &Path) -> Result<Record, Status> {
    let path = dir.join(RECORD);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Status::not_found(format!(
                "no volume at {} (no {RECORD})",
                dir.display()
            )))
        }
        Err(e) => return Err(status::io(&format!("reading {}", path.display()), e)),
    };
    let r: Record = serde_json::from_slice(&bytes)
        .map_err(|e| Status::data_loss(format!("{} is damaged: {e}", path.display())))?;
    if r.version != RECORD_VERSION {
        return Err(Status::failed_precondition(format!(
            "{} has format version {}; this snapblk reads version {RECORD_VERSION}",
            path.display(),
            r.version
        )));
    }
    Ok(r)
}

/// Replaces a volume's record atomically (temporary file, fsync, rename, fsync folder).
fn write_record(dir: &Path, r: &Record) -> Result<(), Status> {
    let path = dir.join(RECORD);
    let tmp = dir.join(format!("{RECORD}.tmp"));
    let ctx = format!("writing {}", path.display());
    let body = serde_json::to_vec(r).map_err(|e| Status::internal(format!("{ctx}: {e}")))?;
    (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })()
    .map_err(|e| status::io(&ctx, e))
}

fn random_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into the live buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b = (t ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    b
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The strings of the array `key` of a daemon's reply (mount points frozen or thawed).
fn strings(reply: &serde_json::Value, key: &str) -> Vec<String> {
    reply
        .get(key)
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
