//! What a CreateVolume or CreateSnapshot request may ask for: StorageClass and
//! VolumeSnapshotClass parameters, volume capabilities and capacity ranges, each checked
//! with a message that says what is allowed.

use std::collections::HashMap;
use std::time::Duration;

use tonic::Status;

use super::proto::csi::{volume_capability, CapacityRange, VolumeCapability};
use super::proto::node::FreezeMode;
use crate::ctl::protocol::MAX_FREEZE_TIMEOUT;
use crate::engine::MAX_BLOCKS;

/// File systems the node plugin can make and mount.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];
/// File system made when neither the capability nor the StorageClass names one.
pub const DEFAULT_FS: &str = "ext4";
/// The smallest volume each file system can be made on (xfsprogs refuses less than
/// 300 MiB); 0 where any size the engine allows will do.
pub fn min_size(fs_type: &str) -> u64 {
    match fs_type {
        "xfs" => 300 << 20,
        _ => 0,
    }
}

/// Size of a volume whose request names no capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Keys Kubernetes reserves for itself: the sidecars add some (`.../pvc/name` with
/// --extra-create-metadata) and pass others unstripped to GetCapacity. Never ours.
const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";

/// StorageClass parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    /// `blockSize`: the device's logical block size, 4096 (default) or 512.
    pub block_size: u32,
    /// `fsType`: file system when the volume capability names none.
    pub fs_type: Option<String>,
}

impl TryFrom<&HashMap<String, String>> for VolumeParams {
    type Error = Status;

    fn try_from(p: &HashMap<String, String>) -> Result<Self, Status> {
        let mut out = VolumeParams {
            block_size: 4096,
            fs_type: None,
        };
        for (k, v) in p {
            match k.as_str() {
                "blockSize" => {
                    out.block_size = match v.as_str() {
                        "4096" => 4096,
                        "512" => 512,
                        _ => {
                            return Err(Status::invalid_argument(format!(
                                "StorageClass parameter blockSize={v:?}: use 4096 or 512"
                            )))
                        }
                    }
                }
                "fsType" | "csi.storage.k8s.io/fstype" => {
                    out.fs_type = Some(fs_type(v).map_err(|e| {
                        Status::invalid_argument(format!(
                            "StorageClass parameter {k}: {}",
                            e.message()
                        ))
                    })?)
                }
                _ if k.starts_with(RESERVED_PREFIX) => {}
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "unknown StorageClass parameter {k:?}: snapblk knows blockSize and fsType (see docs/csi.md)"
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// VolumeSnapshotClass parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotParams {
    /// `freeze`: `auto` (default: freeze the file system when the volume is mounted) or
    /// `none` (crash-consistent).
    pub freeze: FreezeMode,
    /// `freezeTimeout`: longest time the file system may stay frozen, e.g. `10s`
    /// (default: the daemon's, 10 s; at most 300 s).
    pub freeze_timeout: Option<Duration>,
}

impl TryFrom<&HashMap<String, String>> for SnapshotParams {
    type Error = Status;

    fn try_from(p: &HashMap<String, String>) -> Result<Self, Status> {
        let mut out = SnapshotParams {
            freeze: FreezeMode::FreezeAuto,
            freeze_timeout: None,
        };
        for (k, v) in p {
            match k.as_str() {
                "freeze" => {
                    out.freeze = match v.as_str() {
                        "auto" => FreezeMode::FreezeAuto,
                        "none" => FreezeMode::FreezeNone,
                        _ => {
                            return Err(Status::invalid_argument(format!(
                                "VolumeSnapshotClass parameter freeze={v:?}: use auto or none"
                            )))
                        }
                    }
                }
                "freezeTimeout" => {
                    let d = parse_duration(v).filter(|d| {
                        !d.is_zero() && *d <= MAX_FREEZE_TIMEOUT
                    });
                    out.freeze_timeout = Some(d.ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "VolumeSnapshotClass parameter freezeTimeout={v:?}: use a duration such as 500ms, 10s or 2m, at most {}s",
                            MAX_FREEZE_TIMEOUT.as_secs()
                        ))
                    })?);
                }
                _ if k.starts_with(RESERVED_PREFIX) => {}
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "unknown VolumeSnapshotClass parameter {k:?}: snapblk knows freeze and freezeTimeout (see docs/csi.md)"
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// VolumeGroupSnapshotClass parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSnapshotParams {
    /// `freezeTimeout`: the one deadline of the whole window, from the first freeze to
    /// the last cut (default 10 s, at most 300 s).
    pub freeze_timeout: Duration,
}

/// The group window's deadline when the class names none.
pub const DEFAULT_GROUP_FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

impl TryFrom<&HashMap<String, String>> for GroupSnapshotParams {
    type Error = Status;

    fn try_from(p: &HashMap<String, String>) -> Result<Self, Status> {
        let mut out = GroupSnapshotParams {
            freeze_timeout: DEFAULT_GROUP_FREEZE_TIMEOUT,
        };
        for (k, v) in p {
            match k.as_str() {
                "freezeTimeout" => {
                    out.freeze_timeout = parse_duration(v)
                        .filter(|d| !d.is_zero() && *d <= MAX_FREEZE_TIMEOUT)
                        .ok_or_else(|| {
                            Status::invalid_argument(format!(
                                "VolumeGroupSnapshotClass parameter freezeTimeout={v:?}: use a duration such as 500ms, 10s or 2m, at most {}s",
                                MAX_FREEZE_TIMEOUT.as_secs()
                            ))
                        })?;
                }
                _ if k.starts_with(RESERVED_PREFIX) => {}
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "unknown VolumeGroupSnapshotClass parameter {k:?}: snapblk knows freezeTimeout (see docs/csi.md)"
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// `500ms`, `10s`, `2m`.
fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

fn fs_type(v: &str) -> Result<String, Status> {
    if FS_TYPES.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(Status::invalid_argument(format!(
            "file system {v:?} is not supported: use one of {}",
            FS_TYPES.join(", ")
        )))
    }
}

/// How a capability wants the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A mounted file system (`fs_type` empty: the volume's own).
    Mount { fs_type: String, flags: Vec<String> },
    /// The raw block device.
    Block,
}

/// Checks one capability: single-node access modes only, a known file system.
pub fn access(cap: &VolumeCapability) -> Result<Access, Status> {
    use super::proto::csi::volume_capability::access_mode::Mode;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume_capability.access_mode is required"))?;
    match Mode::try_from(mode.mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Ok(
            m @ (Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter),
        ) => {
            return Err(Status::invalid_argument(format!(
                "access mode {} is not supported: a snapblk volume lives on one node, and sharing it across nodes (ReadWriteMany, ReadOnlyMany) would need NFS, which cannot be frozen, so no snapshot of it could be consistent; use ReadWriteOnce or ReadWriteOncePod",
                m.as_str_name()
            )))
        }
        _ => {
            return Err(Status::invalid_argument(format!(
                "unknown or unset access mode {}",
                mode.mode
            )))
        }
    }
    match &cap.access_type {
        Some(volume_capability::AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() {
                fs_type(&m.fs_type)?;
            }
            Ok(Access::Mount {
                fs_type: m.fs_type.clone(),
                flags: m.mount_flags.clone(),
            })
        }
        Some(volume_capability::AccessType::Block(_)) => Ok(Access::Block),
        None => Err(Status::invalid_argument(
            "volume_capability.access_type (mount or block) is required",
        )),
    }
}

/// Checks a request's capabilities: at least one, all supported, all block or all mount.
pub fn accesses(caps: &[VolumeCapability]) -> Result<Vec<Access>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    let all: Vec<Access> = caps.iter().map(access).collect::<Result<_, _>>()?;
    let blocks = all.iter().filter(|a| **a == Access::Block).count();
    if blocks != 0 && blocks != all.len() {
        return Err(Status::invalid_argument(
            "a volume is either a block device or a file system: the capabilities ask for both",
        ));
    }
    let fs: Vec<&String> = all
        .iter()
        .filter_map(|a| match a {
            Access::Mount { fs_type, .. } if !fs_type.is_empty() => Some(fs_type),
            _ => None,
        })
        .collect();
    if fs.windows(2).any(|w| w[0] != w[1]) {
        return Err(Status::invalid_argument(
            "the capabilities ask for different file systems",
        ));
    }
    Ok(all)
}

/// The size to create for a capacity range: the required bytes rounded up to the block
/// size, or the default size (within the limit) when none is required.
pub fn volume_size(range: Option<&CapacityRange>, block_size: u32) -> Result<u64, Status> {
    let bs = u64::from(block_size);
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: required_bytes and limit_bytes cannot be negative",
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(Status::invalid_argument(format!(
            "capacity_range: required_bytes {required} is larger than limit_bytes {limit}"
        )));
    }
    let size = match (required, limit) {
        (0, 0) => DEFAULT_SIZE,
        (0, l) => DEFAULT_SIZE.min(l / bs * bs),
        (r, _) => r.div_ceil(bs) * bs,
    };
    if size == 0 || (limit > 0 && size > limit) {
        return Err(Status::out_of_range(format!(
            "no size in capacity_range [{required}, {limit}] is a multiple of the {block_size}-byte block size"
        )));
    }
    let max = MAX_BLOCKS * bs;
    if size > max {
        return Err(Status::out_of_range(format!(
            "{size} bytes is larger than the largest volume with {block_size}-byte blocks ({max} bytes)"
        )));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::super::proto::csi::volume_capability::{
        access_mode::Mode, AccessMode, BlockVolume, MountVolume,
    };
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cap(mode: Mode, block: bool, fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                volume_capability::AccessType::Block(BlockVolume {})
            } else {
                volume_capability::AccessType::Mount(MountVolume {
                    fs_type: fs.into(),
                    ..Default::default()
                })
            }),
        }
    }

    #[test]
    fn storage_class_parameters() {
        let p = VolumeParams::try_from(&map(&[
            ("blockSize", "512"),
            ("fsType", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .expect("valid");
        assert_eq!(p.block_size, 512);
        assert_eq!(p.fs_type.as_deref(), Some("xfs"));
        assert_eq!(
            VolumeParams::try_from(&map(&[])).expect("empty").block_size,
            4096
        );
        for bad in [
            ("blockSize", "1024"),
            ("fsType", "btrfs"),
            ("replicas", "3"),
        ] {
            let e = VolumeParams::try_from(&map(&[bad])).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(bad.0), "{}", e.message());
        }
    }

    #[test]
    fn snapshot_class_parameters() {
        let p = SnapshotParams::try_from(&map(&[("freeze", "none"), ("freezeTimeout", "2m")]))
            .expect("valid");
        assert_eq!(p.freeze, FreezeMode::FreezeNone);
        assert_eq!(p.freeze_timeout, Some(Duration::from_secs(120)));
        let d = SnapshotParams::try_from(&map(&[])).expect("defaults");
        assert_eq!(d.freeze, FreezeMode::FreezeAuto);
        for bad in [
            ("freeze", "always"),
            ("freezeTimeout", "0s"),
            ("freezeTimeout", "301s"),
            ("freezeTimeout", "10"),
            ("freezeTimeout", "1h"),
            ("consistency", "app"),
        ] {
            assert!(SnapshotParams::try_from(&map(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn group_snapshot_class_parameters() {
        let p = GroupSnapshotParams::try_from(&map(&[("freezeTimeout", "3s")])).expect("valid");
        assert_eq!(p.freeze_timeout, Duration::from_secs(3));
        let d = GroupSnapshotParams::try_from(&map(&[(
            "csi.storage.k8s.io/group-snapshotter-secret-name",
            "x",
        )]))
        .expect("defaults");
        assert_eq!(d.freeze_timeout, DEFAULT_GROUP_FREEZE_TIMEOUT);
        for bad in [
            ("freezeTimeout", "0ms"),
            ("freezeTimeout", "6m"),
            ("freeze", "none"),
        ] {
            let e = GroupSnapshotParams::try_from(&map(&[bad])).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(bad.0), "{}", e.message());
        }
    }

    #[test]
    fn capabilities() {
        assert_eq!(
            access(&cap(Mode::SingleNodeWriter, false, "")).expect("ok"),
            Access::Mount {
                fs_type: String::new(),
                flags: vec![]
            }
        );
        assert_eq!(
            access(&cap(Mode::SingleNodeSingleWriter, true, "")).expect("ok"),
            Access::Block
        );
        let e = access(&cap(Mode::MultiNodeMultiWriter, false, "")).expect_err("rwx");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("NFS"), "{}", e.message());
        assert!(access(&cap(Mode::SingleNodeWriter, false, "btrfs")).is_err());
        assert!(access(&VolumeCapability::default()).is_err());
        assert!(accesses(&[]).is_err());
        assert!(accesses(&[
            cap(Mode::SingleNodeWriter, true, ""),
            cap(Mode::SingleNodeWriter, false, "")
        ])
        .is_err());
        assert!(accesses(&[
            cap(Mode::SingleNodeWriter, false, "ext4"),
            cap(Mode::SingleNodeWriter, false, "xfs")
        ])
        .is_err());
    }

    #[test]
    fn sizes() {
        let r = |req: i64, lim: i64| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(volume_size(None, 4096).expect("default"), DEFAULT_SIZE);
        assert_eq!(volume_size(Some(&r(1, 0)), 4096).expect("up"), 4096);
        assert_eq!(
            volume_size(Some(&r(10 << 30, 10 << 30)), 4096).expect("exact"),
            10 << 30
        );
        assert_eq!(volume_size(Some(&r(0, 8192)), 4096).expect("limit"), 8192);
        assert_eq!(
            volume_size(Some(&r(1, 4095)), 4096)
                .expect_err("fit")
                .code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            volume_size(Some(&r(5, 4)), 4096).expect_err("order").code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            volume_size(Some(&r(-1, 0)), 4096).expect_err("neg").code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            volume_size(Some(&r(i64::MAX, 0)), 512)
                .expect_err("huge")
                .code(),
            tonic::Code::OutOfRange
        );
    }
}
