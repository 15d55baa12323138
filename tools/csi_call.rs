//! `csi-call`: sends one CSI call to a driver's Unix socket with the fields the kubelet and
//! the Kubernetes sidecars send, and prints the answer as `key=value` lines (for shell
//! tests), ending with `elapsed_ms=N`, the call's latency. A gRPC error is printed as
//! `error_code=NAME` and `error=MESSAGE` on stderr, and the exit status is 3.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use snapblk::csi::proto::csi::{
    self, controller_client::ControllerClient, group_controller_client::GroupControllerClient,
    identity_client::IdentityClient, node_client::NodeClient,
    snapshot_metadata_client::SnapshotMetadataClient, volume_capability, volume_content_source,
};
use snapblk::csi::transport::{socket_path, unix_channel};

#[derive(Parser)]
#[command(name = "csi-call", about = "Send one CSI call, as Kubernetes would")]
struct Cli {
    /// The driver's CSI endpoint.
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    #[command(subcommand)]
    call: Call,
}

/// How the volume is used: a file system (default ext4 from the volume) or raw blocks.
#[derive(clap::Args, Clone)]
struct Access {
    /// Raw block access instead of a file system.
    #[arg(long)]
    block: bool,
    /// File system type for mount access ("" lets the driver choose).
    #[arg(long, default_value = "")]
    fs: String,
    /// Mount flags (repeatable).
    #[arg(long = "mount-flag")]
    flags: Vec<String>,
}

#[derive(Subcommand)]
enum Call {
    Probe,
    NodeInfo,
    /// The external-provisioner's CreateVolume (WaitForFirstConsumer on --node).
    CreateVolume {
        #[arg(long)]
        name: String,
        #[arg(long)]
        size: i64,
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        from_snapshot: Option<String>,
        #[arg(long)]
        from_volume: Option<String>,
        /// StorageClass parameter KEY=VALUE (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
        #[command(flatten)]
        access: Access,
    },
    DeleteVolume {
        #[arg(long)]
        volume: String,
    },
    /// The external-snapshotter's CreateSnapshot.
    CreateSnapshot {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        name: String,
        /// VolumeSnapshotClass parameter KEY=VALUE (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
    },
    DeleteSnapshot {
        #[arg(long)]
        snapshot: String,
    },
    /// The external-snapshotter's CreateVolumeGroupSnapshot. Prints the group, then each
    /// member (snapshot_id, source_volume_id, ...) and the freeze window the driver
    /// reports (freeze_window_us, frozen_max_us).
    CreateGroupSnapshot {
        #[arg(long)]
        name: String,
        /// A member volume (repeatable).
        #[arg(long = "volume", required = true)]
        volumes: Vec<String>,
        /// VolumeGroupSnapshotClass parameter KEY=VALUE (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
    },
    GetGroupSnapshot {
        #[arg(long)]
        group: String,
        /// A member snapshot the CO knows (repeatable).
        #[arg(long = "snapshot")]
        snapshots: Vec<String>,
    },
    DeleteGroupSnapshot {
        #[arg(long)]
        group: String,
        #[arg(long = "snapshot")]
        snapshots: Vec<String>,
    },
    ListSnapshots {
        #[arg(long, default_value = "")]
        snapshot: String,
        #[arg(long, default_value = "")]
        volume: String,
    },
    /// The external-resizer's ControllerExpandVolume.
    Expand {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        size: i64,
        #[command(flatten)]
        access: Access,
    },
    /// The kubelet's NodeStageVolume.
    Stage {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        staging: PathBuf,
        #[command(flatten)]
        access: Access,
    },
    Unstage {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        staging: PathBuf,
    },
    /// The kubelet's NodePublishVolume.
    Publish {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        staging: PathBuf,
        #[arg(long)]
        target: PathBuf,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        access: Access,
    },
    Unpublish {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        target: PathBuf,
    },
    /// The kubelet's NodeExpandVolume.
    NodeExpand {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        staging: Option<PathBuf>,
        #[arg(long)]
        size: i64,
        #[command(flatten)]
        access: Access,
    },
    Stats {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        path: PathBuf,
    },
    /// The external-snapshot-metadata sidecar's GetMetadataAllocated: prints
    /// `range=OFFSET,LENGTH` per allocated range.
    MetadataAllocated {
        #[arg(long)]
        snapshot: String,
        #[arg(long, default_value_t = 0)]
        starting_offset: i64,
        #[arg(long, default_value_t = 0)]
        max_results: i32,
    },
    /// GetMetadataDelta: prints `range=OFFSET,LENGTH` per changed range.
    MetadataDelta {
        #[arg(long)]
        base: String,
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 0)]
        starting_offset: i64,
        #[arg(long, default_value_t = 0)]
        max_results: i32,
    },
}

/// Prints a stream's ranges; its messages' type and capacity once.
fn print_ranges(kind: i32, capacity: i64, ranges: &[csi::BlockMetadata], first: &mut bool) {
    if *first {
        let t = csi::BlockMetadataType::try_from(kind)
            .map(|t| t.as_str_name().to_string())
            .unwrap_or_default();
        println!("block_metadata_type={t}");
        println!("volume_capacity_bytes={capacity}");
        *first = false;
    }
    for r in ranges {
        println!("range={},{}", r.byte_offset, r.size_bytes);
    }
}

fn capability(a: &Access) -> csi::VolumeCapability {
    // What the sidecars and the kubelet send for ReadWriteOnce with a driver that has
    // SINGLE_NODE_MULTI_WRITER.
    let mode = volume_capability::access_mode::Mode::SingleNodeMultiWriter as i32;
    csi::VolumeCapability {
        access_mode: Some(volume_capability::AccessMode { mode }),
        access_type: Some(if a.block {
            volume_capability::AccessType::Block(volume_capability::BlockVolume {})
        } else {
            volume_capability::AccessType::Mount(volume_capability::MountVolume {
                fs_type: a.fs.clone(),
                mount_flags: a.flags.clone(),
                volume_mount_group: String::new(),
            })
        }),
    }
}

fn params(kv: &[String]) -> Result<HashMap<String, String>, String> {
    kv.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("parameter {s:?}: expected KEY=VALUE"))
        })
        .collect()
}

fn topo(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([("topology.csi.snapblk.io/node".to_string(), node.to_string())]),
    }
}

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

fn print_volume(v: &csi::Volume) {
    println!("volume_id={}", v.volume_id);
    println!("capacity_bytes={}", v.capacity_bytes);
    for t in &v.accessible_topology {
        for (k, val) in &t.segments {
            println!("topology={k}={val}");
        }
    }
}

fn print_snapshot(s: &csi::Snapshot) {
    println!("snapshot_id={}", s.snapshot_id);
    println!("source_volume_id={}", s.source_volume_id);
    println!("size_bytes={}", s.size_bytes);
    println!("ready_to_use={}", s.ready_to_use);
    if !s.group_snapshot_id.is_empty() {
        println!("group_snapshot_id={}", s.group_snapshot_id);
    }
}

fn print_group(g: &csi::VolumeGroupSnapshot) {
    println!("group_snapshot_id={}", g.group_snapshot_id);
    println!("group_ready_to_use={}", g.ready_to_use);
    println!("members={}", g.snapshots.len());
    for s in &g.snapshots {
        print_snapshot(s);
    }
}

async fn call(endpoint: &str, c: Call) -> Result<(), tonic::Status> {
    let sock = socket_path(endpoint).map_err(tonic::Status::invalid_argument)?;
    let ch = unix_channel(&sock);
    let mut id = IdentityClient::new(ch.clone());
    let mut ctl = ControllerClient::new(ch.clone());
    let mut group = GroupControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch.clone());
    let mut meta = SnapshotMetadataClient::new(ch);
    let bad = |e: String| tonic::Status::invalid_argument(e);
    match c {
        Call::Probe => {
            let r = id.probe(csi::ProbeRequest {}).await?.into_inner();
            println!("ready={}", r.ready.unwrap_or(true));
        }
        Call::NodeInfo => {
            let r = node
                .node_get_info(csi::NodeGetInfoRequest {})
                .await?
                .into_inner();
            println!("node_id={}", r.node_id);
        }
        Call::CreateVolume {
            name,
            size,
            node: on,
            from_snapshot,
            from_volume,
            params: p,
            access,
        } => {
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource { snapshot_id: s },
                )),
                (None, Some(v)) => Some(volume_content_source::Type::Volume(
                    volume_content_source::VolumeSource { volume_id: v },
                )),
                (None, None) => None,
            };
            let r = ctl
                .create_volume(csi::CreateVolumeRequest {
                    name: name.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![capability(&access)],
                    parameters: params(&p).map_err(bad)?,
                    volume_content_source: source
                        .map(|t| csi::VolumeContentSource { r#type: Some(t) }),
                    accessibility_requirements: on.map(|n| csi::TopologyRequirement {
                        requisite: vec![topo(&n)],
                        preferred: vec![topo(&n)],
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if let Some(v) = r.volume {
                print_volume(&v);
            }
        }
        Call::DeleteVolume { volume } => {
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: volume,
                ..Default::default()
            })
            .await?;
        }
        Call::CreateSnapshot {
            volume,
            name,
            params: p,
        } => {
            let r = ctl
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: volume,
                    name,
                    parameters: params(&p).map_err(bad)?,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if let Some(s) = r.snapshot {
                print_snapshot(&s);
            }
        }
        Call::DeleteSnapshot { snapshot } => {
            ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snapshot,
                ..Default::default()
            })
            .await?;
        }
        Call::CreateGroupSnapshot {
            name,
            volumes,
            params: p,
        } => {
            let r = group
                .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                    name,
                    source_volume_ids: volumes,
                    parameters: params(&p).map_err(bad)?,
                    ..Default::default()
                })
                .await?;
            for key in ["snapblk-freeze-window-us", "snapblk-frozen-max-us"] {
                if let Some(v) = r.metadata().get(key).and_then(|v| v.to_str().ok()) {
                    println!(
                        "{}={v}",
                        key.trim_start_matches("snapblk-").replace('-', "_")
                    );
                }
            }
            if let Some(g) = r.into_inner().group_snapshot {
                print_group(&g);
            }
        }
        Call::GetGroupSnapshot {
            group: id,
            snapshots,
        } => {
            let r = group
                .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                    group_snapshot_id: id,
                    snapshot_ids: snapshots,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if let Some(g) = r.group_snapshot {
                print_group(&g);
            }
        }
        Call::DeleteGroupSnapshot {
            group: id,
            snapshots,
        } => {
            group
                .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: id,
                    snapshot_ids: snapshots,
                    ..Default::default()
                })
                .await?;
        }
        Call::ListSnapshots { snapshot, volume } => {
            let r = ctl
                .list_snapshots(csi::ListSnapshotsRequest {
                    snapshot_id: snapshot,
                    source_volume_id: volume,
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("count={}", r.entries.len());
            for e in r.entries.iter().filter_map(|e| e.snapshot.as_ref()) {
                print_snapshot(e);
            }
        }
        Call::Expand {
            volume,
            size,
            access,
        } => {
            let r = ctl
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: volume,
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(capability(&access)),
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("capacity_bytes={}", r.capacity_bytes);
            println!("node_expansion_required={}", r.node_expansion_required);
        }
        Call::Stage {
            volume,
            staging,
            access,
        } => {
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: volume,
                staging_target_path: path(&staging),
                volume_capability: Some(capability(&access)),
                ..Default::default()
            })
            .await?;
        }
        Call::Unstage { volume, staging } => {
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume,
                staging_target_path: path(&staging),
            })
            .await?;
        }
        Call::Publish {
            volume,
            staging,
            target,
            readonly,
            access,
        } => {
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: volume,
                staging_target_path: path(&staging),
                target_path: path(&target),
                volume_capability: Some(capability(&access)),
                readonly,
                ..Default::default()
            })
            .await?;
        }
        Call::Unpublish { volume, target } => {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume,
                target_path: path(&target),
            })
            .await?;
        }
        Call::NodeExpand {
            volume,
            path: p,
            staging,
            size,
            access,
        } => {
            let r = node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: volume,
                    volume_path: path(&p),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size,
                        limit_bytes: 0,
                    }),
                    staging_target_path: staging.as_deref().map(path).unwrap_or_default(),
                    volume_capability: Some(capability(&access)),
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("capacity_bytes={}", r.capacity_bytes);
        }
        Call::MetadataAllocated {
            snapshot,
            starting_offset,
            max_results,
        } => {
            let mut stream = meta
                .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
                    snapshot_id: snapshot,
                    starting_offset,
                    max_results,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut first = true;
            while let Some(m) = stream.message().await? {
                print_ranges(
                    m.block_metadata_type,
                    m.volume_capacity_bytes,
                    &m.block_metadata,
                    &mut first,
                );
            }
        }
        Call::MetadataDelta {
            base,
            target,
            starting_offset,
            max_results,
        } => {
            let mut stream = meta
                .get_metadata_delta(csi::GetMetadataDeltaRequest {
                    base_snapshot_id: base,
                    target_snapshot_id: target,
                    starting_offset,
                    max_results,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut first = true;
            while let Some(m) = stream.message().await? {
                print_ranges(
                    m.block_metadata_type,
                    m.volume_capacity_bytes,
                    &m.block_metadata,
                    &mut first,
                );
            }
        }
        Call::Stats { volume, path: p } => {
            let r = node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: volume,
                    volume_path: path(&p),
                    staging_target_path: String::new(),
                })
                .await?
                .into_inner();
            for u in &r.usage {
                let unit = csi::volume_usage::Unit::try_from(u.unit)
                    .map(|u| u.as_str_name().to_lowercase())
                    .unwrap_or_default();
                println!("{unit}_total={}", u.total);
                println!("{unit}_used={}", u.used);
                println!("{unit}_available={}", u.available);
            }
            if let Some(c) = r.volume_condition {
                println!("abnormal={}", c.abnormal);
                println!("condition={}", c.message);
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("csi-call: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let t0 = Instant::now();
    let result = rt.block_on(call(&cli.endpoint, cli.call));
    println!("elapsed_ms={}", t0.elapsed().as_millis());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(s) => {
            println!("error_code={:?}", s.code());
            eprintln!("error={}", s.message());
            ExitCode::from(3)
        }
    }
}
