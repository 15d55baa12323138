//! The CSI driver as a cluster uses it, without a kernel driver: a controller and two node
//! plugins ("node-a", "node-b") in this process, each serving real gRPC (the CSI services
//! on Unix sockets, the controller-to-node contract on loopback TCP with its token). The
//! calls are the ones the Kubernetes sidecars make, with their fields; the node side of
//! staging needs ublk and is proven in vm-tests/guest/20-csi-*.sh.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapblk::csi::agent;
use snapblk::csi::auth::Token;
use snapblk::csi::controller::Controller;
use snapblk::csi::identity::{Identity, Role};
use snapblk::csi::metrics::{MetricsSources, RpcMetrics};
use snapblk::csi::proto::csi::{
    self, controller_client::ControllerClient, group_controller_client::GroupControllerClient,
    identity_client::IdentityClient, node_client::NodeClient,
    snapshot_metadata_client::SnapshotMetadataClient, volume_capability, volume_content_source,
};
use snapblk::csi::proto::node::{
    self as pb, node_agent_client::NodeAgentClient, registry_client::RegistryClient,
};
use snapblk::csi::registry::Registry;
use snapblk::csi::server::{self, NodeOptions};
use snapblk::csi::snapshot_metadata::{MetadataStyle, SnapshotMetadata};
use snapblk::csi::transport::unix_channel;
use snapblk::engine::Volume;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::Code;

const DRIVER: &str = "csi.snapblk.io";
const TOPO: &str = "topology.csi.snapblk.io/node";
const MIB: i64 = 1 << 20;

/// A node plugin, on a runtime of its own: stopping it ends every task it has, accepted
/// connections included, as when the node goes down.
struct NodeProc {
    sock: PathBuf,
    state: PathBuf,
    agent_addr: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        // A runtime dropped inside the test's own runtime would block it; let it end
        // by itself.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

struct ControllerProc {
    sock: PathBuf,
    /// Where its metrics endpoint listens.
    metrics: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Cluster {
    dir: tempfile::TempDir,
    token: Token,
    registry_addr: std::net::SocketAddr,
    controller: Option<ControllerProc>,
    nodes: HashMap<String, NodeProc>,
}

async fn start_controller(dir: &Path, token: &Token, addr: std::net::SocketAddr) -> ControllerProc {
    let sock = dir.join("controller.sock");
    let (stop, rx) = watch::channel(false);
    let registry = Arc::new(Registry::new(token.clone()));
    // The address may still be held for a moment by the previous controller.
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let ctl = Controller {
        driver_name: DRIVER.into(),
        registry: registry.clone(),
    };
    let meta = SnapshotMetadata {
        registry: registry.clone(),
        style: MetadataStyle::Variable,
    };
    let identity = Identity {
        driver_name: DRIVER.into(),
        role: Role::Controller,
    };
    let t1 = tokio::spawn({
        let (token, rx) = (token.clone(), rx.clone());
        async move {
            server::serve_registry(listener, registry, token, rx)
                .await
                .expect("registry");
        }
    });
    let rpc = Arc::new(RpcMetrics::default());
    let s = sock.clone();
    let t2 = tokio::spawn({
        let (rpc, rx) = (rpc.clone(), rx.clone());
        async move {
            server::serve_csi(&s, identity, Some(ctl), Some(meta), None, Some(rpc), rx)
                .await
                .expect("csi");
        }
    });
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("metrics port");
    let metrics = metrics_listener.local_addr().expect("metrics addr");
    let sources = MetricsSources {
        rpc: Some(rpc),
        node: None,
    };
    let t3 = tokio::spawn(async move {
        server::serve_metrics(metrics_listener, sources, rx)
            .await
            .expect("metrics");
    });
    wait_socket(&sock).await;
    ControllerProc {
        sock,
        metrics,
        stop,
        tasks: vec![t1, t2, t3],
    }
}

async fn start_node(
    dir: &Path,
    name: &str,
    token: &Token,
    registry: std::net::SocketAddr,
) -> NodeProc {
    let state = dir.join(name);
    let sock = dir.join(format!("{name}.sock"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("node runtime");
    // The node's shutdown signal is never sent: the runtime's end stops it.
    let (_stop, rx) = watch::channel(false);
    std::mem::forget(_stop);
    let parts = server::node_parts(&NodeOptions {
        node_id: name.into(),
        driver_name: DRIVER.into(),
        state_dir: state.clone(),
        exe: PathBuf::from(env!("CARGO_BIN_EXE_snapblk")),
        max_volumes: 0,
    })
    .expect("node parts");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let agent_addr = format!("http://{}", listener.local_addr().expect("addr"));
    runtime.spawn({
        let (token, rx) = (token.clone(), rx.clone());
        async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            server::serve_agent(listener, parts.agent, token, rx)
                .await
                .expect("agent");
        }
    });
    let identity = Identity {
        driver_name: DRIVER.into(),
        role: Role::Node,
    };
    let s = sock.clone();
    runtime.spawn(async move {
        server::serve_csi(&s, identity, None, None, Some(parts.node), None, rx)
            .await
            .expect("csi");
    });
    runtime.spawn(agent::heartbeat(
        format!("http://{registry}"),
        name.into(),
        agent_addr.clone(),
        token.clone(),
    ));
    wait_socket(&sock).await;
    NodeProc {
        sock,
        state,
        agent_addr,
        runtime: Some(runtime),
    }
}

async fn wait_socket(p: &Path) {
    for _ in 0..200 {
        if p.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", p.display());
}

impl Cluster {
    async fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = Token::new("test-token-0123456789abcdef").expect("token");
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        let registry_addr = probe.local_addr().expect("addr");
        drop(probe);
        let controller = start_controller(dir.path(), &token, registry_addr).await;
        let mut c = Cluster {
            dir,
            token,
            registry_addr,
            controller: Some(controller),
            nodes: HashMap::new(),
        };
        for n in ["node-a", "node-b"] {
            let p = start_node(c.dir.path(), n, &c.token, c.registry_addr).await;
            c.nodes.insert(n.into(), p);
        }
        c.wait_registered(&["node-a", "node-b"]).await;
        c
    }

    fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(unix_channel(
            &self.controller.as_ref().expect("controller").sock,
        ))
    }

    fn node(&self, n: &str) -> NodeClient<Channel> {
        NodeClient::new(unix_channel(&self.nodes[n].sock))
    }

    /// Waits until the controller can place volumes on every node of `names`.
    async fn wait_registered(&self, names: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for n in names {
                let r = self
                    .ctl()
                    .get_capacity(csi::GetCapacityRequest {
                        accessible_topology: Some(topo(n)),
                        ..Default::default()
                    })
                    .await
                    .expect("capacity");
                ok &= r.into_inner().available_capacity > 0;
            }
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {names:?} never registered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop_node(&mut self, n: &str) {
        drop(self.nodes.remove(n).expect("node"));
    }

    async fn restart_controller(&mut self) {
        let c = self.controller.take().expect("controller");
        let _ = c.stop.send(true);
        for t in c.tasks {
            let _ = t.await;
        }
        self.controller =
            Some(start_controller(self.dir.path(), &self.token, self.registry_addr).await);
    }

    /// The folder of a volume on its node.
    fn folder(&self, volume_id: &str) -> PathBuf {
        let (node, key) = volume_id.split_once('/').expect("volume id");
        self.nodes[node].state.join("volumes").join(key)
    }
}

fn topo(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPO.to_string(), node.to_string())]),
    }
}

fn mount_cap(mode: volume_capability::access_mode::Mode, fs: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            },
        )),
    }
}

fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
    }
}

use volume_capability::access_mode::Mode;

/// The external-provisioner's CreateVolume for a WaitForFirstConsumer PVC whose pod the
/// scheduler put on `selected` (default flags: requisite = every node, preferred rotated so
/// the selected node comes first), with --extra-create-metadata.
fn provisioner_request(
    name: &str,
    size: i64,
    selected: &str,
    all: &[&str],
) -> csi::CreateVolumeRequest {
    let mut sorted: Vec<&str> = all.to_vec();
    sorted.sort();
    let pos = sorted
        .iter()
        .position(|n| *n == selected)
        .expect("selected");
    let preferred: Vec<csi::Topology> = sorted[pos..]
        .iter()
        .chain(sorted[..pos].iter())
        .map(|n| topo(n))
        .collect();
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeMultiWriter, "ext4")],
        parameters: HashMap::from([
            ("csi.storage.k8s.io/pvc/name".into(), "data".into()),
            ("csi.storage.k8s.io/pvc/namespace".into(), "db".into()),
            ("csi.storage.k8s.io/pv/name".into(), name.into()),
        ]),
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite: sorted.iter().map(|n| topo(n)).collect(),
            preferred,
        }),
        ..Default::default()
    }
}

fn snapshotter_request(name: &str, volume_id: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: volume_id.into(),
        name: name.into(),
        parameters: HashMap::from([
            (
                "csi.storage.k8s.io/volumesnapshot/name".into(),
                "before-upgrade".into(),
            ),
            (
                "csi.storage.k8s.io/volumesnapshot/namespace".into(),
                "db".into(),
            ),
            (
                "csi.storage.k8s.io/volumesnapshotcontent/name".into(),
                "snapcontent-x".into(),
            ),
        ]),
        ..Default::default()
    }
}

fn restore_request(
    name: &str,
    size: i64,
    snapshot_id: &str,
    node: &str,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: snapshot_id.into(),
                },
            )),
        }),
        ..provisioner_request(name, size, node, &[node])
    }
}

/// Writes `data` at `offset` of the (unserved) volume whose folder is `dir`.
fn write_volume(dir: &Path, offset: u64, data: &[u8]) {
    let v = Volume::open(dir).expect("open volume");
    v.write(offset, data, false).expect("write");
    v.close().expect("close");
}

fn read_volume(dir: &Path, offset: u64, len: usize) -> Vec<u8> {
    let v = Volume::open(dir).expect("open volume");
    let mut buf = vec![0u8; len];
    v.read(offset, &mut buf).expect("read");
    v.close().expect("close");
    buf
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => {
            assert!(!s.message().is_empty(), "an error without a message: {s:?}");
            s.code()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_node_info() {
    let c = Cluster::new().await;
    for sock in [
        &c.controller.as_ref().expect("ctl").sock,
        &c.nodes["node-a"].sock,
    ] {
        let mut id = IdentityClient::new(unix_channel(sock));
        let info = id
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.name, DRIVER);
        assert!(!info.vendor_version.is_empty());
        let caps = id
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .expect("caps")
            .into_inner()
            .capabilities;
        let text = format!("{caps:?}");
        assert_eq!(caps.len(), 5, "{text}");
        assert!(text.contains("SnapshotMetadataService"), "{text}");
        assert!(text.contains("GroupControllerService"), "{text}");
    }
    let mut ctl_id = IdentityClient::new(unix_channel(&c.controller.as_ref().expect("ctl").sock));
    let probe = ctl_id
        .probe(csi::ProbeRequest {})
        .await
        .expect("controller probe");
    assert_eq!(probe.into_inner().ready, Some(true));
    // A node without the ublk driver is not ready, and says why.
    if !Path::new("/dev/ublk-control").exists() {
        let mut node_id = IdentityClient::new(unix_channel(&c.nodes["node-a"].sock));
        let e = node_id
            .probe(csi::ProbeRequest {})
            .await
            .expect_err("no ublk here");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("ublk_drv"), "{}", e.message());
    }
    let info = c
        .node("node-b")
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .expect("node info")
        .into_inner();
    assert_eq!(info.node_id, "node-b");
    assert_eq!(info.accessible_topology, Some(topo("node-b")));
    let ncaps = c
        .node("node-a")
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .expect("node caps")
        .into_inner()
        .capabilities;
    assert_eq!(ncaps.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_snapshot_restore_across_two_nodes() {
    let c = Cluster::new().await;
    let mut ctl = c.ctl();
    let all = ["node-a", "node-b"];

    // WaitForFirstConsumer: the volume goes where the pod was scheduled.
    let req = provisioner_request(
        "pvc-4b1e7c1a-0000-4000-8000-000000000001",
        64 * MIB,
        "node-b",
        &all,
    );
    let vol = ctl
        .create_volume(req.clone())
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    assert!(vol.volume_id.starts_with("node-b/"), "{}", vol.volume_id);
    assert_eq!(vol.capacity_bytes, 64 * MIB);
    assert_eq!(vol.accessible_topology, vec![topo("node-b")]);
    assert!(vol.volume_id.len() <= 128);
    // The provisioner retries: same name and arguments, same volume.
    let again = ctl
        .create_volume(req.clone())
        .await
        .expect("retry")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(again.volume_id, vol.volume_id);
    // Same name, other size: AlreadyExists.
    let mut bigger = req.clone();
    bigger.capacity_range = Some(csi::CapacityRange {
        required_bytes: 128 * MIB,
        limit_bytes: 0,
    });
    assert_eq!(code(ctl.create_volume(bigger).await), Code::AlreadyExists);
    // --strict-topology: requisite and preferred are the selected node only.
    let mut strict = provisioner_request("pvc-strict", 16 * MIB, "node-a", &["node-a"]);
    strict.volume_capabilities = vec![block_cap()];
    let on_a = ctl
        .create_volume(strict)
        .await
        .expect("strict")
        .into_inner()
        .volume
        .expect("volume");
    assert!(on_a.volume_id.starts_with("node-a/"), "{}", on_a.volume_id);

    // Data in the volume before the snapshot (written through the engine: no ublk here).
    let folder = c.folder(&vol.volume_id);
    let before = vec![0xa5u8; 8192];
    write_volume(&folder, 4096, &before);

    // The external-snapshotter's CreateSnapshot, repeated until ready_to_use.
    let sreq = snapshotter_request(
        "snapshot-9c0d7f0e-0000-4000-8000-000000000001",
        &vol.volume_id,
    );
    let snap = ctl
        .create_snapshot(sreq.clone())
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, vol.volume_id);
    assert_eq!(snap.size_bytes, 64 * MIB);
    assert!(snap
        .creation_time
        .as_ref()
        .is_some_and(|t| t.seconds > 1_600_000_000));
    let snap2 = ctl
        .create_snapshot(sreq.clone())
        .await
        .expect("again")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert_eq!(snap2.snapshot_id, snap.snapshot_id);
    let mut other_source = sreq.clone();
    other_source.source_volume_id = on_a.volume_id.clone();
    assert_eq!(
        code(ctl.create_snapshot(other_source).await),
        Code::AlreadyExists
    );

    // Writes after the snapshot are not in it.
    write_volume(&folder, 4096, &[0x5au8; 4096]);

    // A pre-provisioned VolumeSnapshotContent (a backup tool's import): ListSnapshots by ID.
    let listed = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list by id")
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].snapshot.as_ref(), Some(&snap));

    // Restore: on the snapshot's node, larger than the snapshot, no data copied.
    let rreq = restore_request("pvc-restored-1", 96 * MIB, &snap.snapshot_id, "node-b");
    let restored = ctl
        .create_volume(rreq.clone())
        .await
        .expect("restore")
        .into_inner()
        .volume
        .expect("volume");
    assert!(restored.volume_id.starts_with("node-b/"));
    assert_eq!(restored.capacity_bytes, 96 * MIB);
    assert!(
        restored.content_source.is_some(),
        "the provisioner needs content_source back"
    );
    assert_eq!(
        read_volume(&c.folder(&restored.volume_id), 4096, 8192),
        before
    );
    assert_eq!(
        read_volume(&c.folder(&restored.volume_id), 80 * MIB as u64, 4096),
        vec![0; 4096]
    );
    // A requisite topology that excludes the snapshot's node.
    let elsewhere = restore_request(
        "pvc-restored-elsewhere",
        64 * MIB,
        &snap.snapshot_id,
        "node-a",
    );
    assert_eq!(
        code(ctl.create_volume(elsewhere).await),
        Code::ResourceExhausted
    );
    // Smaller than the snapshot.
    let small = restore_request("pvc-restored-small", 32 * MIB, &snap.snapshot_id, "node-b");
    assert_eq!(code(ctl.create_volume(small).await), Code::OutOfRange);
    // A clone of a volume: O(1) on its node, holding the volume as it is now.
    let mut creq = provisioner_request("pvc-clone-1", 64 * MIB, "node-b", &all);
    creq.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: vol.volume_id.clone(),
            },
        )),
    });
    let clone = ctl
        .create_volume(creq)
        .await
        .expect("clone")
        .into_inner()
        .volume
        .expect("volume");
    assert!(clone.volume_id.starts_with("node-b/"));
    assert_eq!(
        read_volume(&c.folder(&clone.volume_id), 4096, 4096),
        vec![0x5a; 4096]
    );
    // The clone's helper snapshot is gone from the source.
    let of_source = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list by volume")
        .into_inner()
        .entries;
    assert_eq!(of_source.len(), 1);

    // Delete the source volume: its snapshot stays and can still be restored.
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete source");
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete is idempotent");
    let vols = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .entries;
    assert!(vols
        .iter()
        .all(|e| e.volume.as_ref().expect("v").volume_id != vol.volume_id));
    assert_eq!(vols.len(), 3, "strict, restored, clone: {vols:?}");
    let still = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .entries;
    assert_eq!(still.len(), 1, "the snapshot outlives its volume");
    let late = ctl
        .create_volume(restore_request(
            "pvc-restored-2",
            64 * MIB,
            &snap.snapshot_id,
            "node-b",
        ))
        .await
        .expect("restore after delete")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(read_volume(&c.folder(&late.volume_id), 4096, 8192), before);
    // The name of a deleted volume cannot be reused while its snapshots hold it.
    assert_eq!(
        code(ctl.create_volume(req.clone()).await),
        Code::AlreadyExists
    );
    // The last snapshot gone, the deleted volume's folder goes too.
    assert!(folder.exists());
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete snapshot");
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete snapshot is idempotent");
    assert!(
        !folder.exists(),
        "the deleted volume's folder stayed after its last snapshot"
    );
    // Restores are independent of their source.
    assert_eq!(read_volume(&c.folder(&late.volume_id), 4096, 8192), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_down_controller_restart_and_tokens() {
    let mut c = Cluster::new().await;
    let mut ctl = c.ctl();
    let a = ctl
        .create_volume(provisioner_request(
            "pvc-on-a",
            16 * MIB,
            "node-a",
            &["node-a"],
        ))
        .await
        .expect("on a")
        .into_inner()
        .volume
        .expect("v");
    let b = ctl
        .create_volume(provisioner_request(
            "pvc-on-b",
            16 * MIB,
            "node-b",
            &["node-b"],
        ))
        .await
        .expect("on b")
        .into_inner()
        .volume
        .expect("v");
    let s = ctl
        .create_snapshot(snapshotter_request("snapshot-on-b", &b.volume_id))
        .await
        .expect("snap")
        .into_inner()
        .snapshot
        .expect("s");

    // The controller restarts: it knows the nodes again from their heartbeats, and
    // every volume and snapshot is still there.
    c.restart_controller().await;
    c.wait_registered(&["node-a", "node-b"]).await;
    let mut ctl = c.ctl();
    let mut ids: Vec<String> = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.expect("v").volume_id)
        .collect();
    ids.sort();
    assert_eq!(ids, vec![a.volume_id.clone(), b.volume_id.clone()]);
    let snaps = ctl
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .expect("snaps")
        .into_inner()
        .entries;
    assert_eq!(snaps.len(), 1);
    assert_eq!(
        snaps[0].snapshot.as_ref().expect("s").snapshot_id,
        s.snapshot_id
    );

    // Unauthenticated callers are refused by the node agent and by the registry.
    let agent_addr = c.nodes["node-a"].agent_addr.clone();
    let mut bare = NodeAgentClient::connect(agent_addr.clone())
        .await
        .expect("connect");
    let e = bare
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = bare
        .delete_volume(pb::DeleteVolumeRequest {
            key: a.volume_id.split_once('/').expect("id").1.into(),
        })
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let wrong = Token::new("not-the-token-0123456789").expect("t");
    let ch = tonic::transport::Endpoint::from_shared(agent_addr)
        .expect("uri")
        .connect()
        .await
        .expect("c");
    let mut forged = NodeAgentClient::with_interceptor(ch, wrong.bearer());
    assert_eq!(
        forged
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect_err("wrong")
            .code(),
        Code::Unauthenticated
    );
    let mut reg = RegistryClient::connect(format!("http://{}", c.registry_addr))
        .await
        .expect("reg");
    let e = reg
        .heartbeat(pb::HeartbeatRequest {
            node_id: "node-a".into(),
            agent_address: "http://127.0.0.1:9".into(),
            version: "evil".into(),
        })
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
    // The volume on node-a is still intact (the forged heartbeat moved nothing).
    assert!(c.folder(&a.volume_id).exists());

    // node-a goes down: its volumes answer Unavailable; node-b works on.
    c.stop_node("node-a").await;
    let e = ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("node down");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("node-a"), "{}", e.message());
    let e = ctl
        .create_volume(provisioner_request(
            "pvc-on-a-2",
            16 * MIB,
            "node-a",
            &["node-a"],
        ))
        .await
        .expect_err("node down");
    assert!(
        matches!(e.code(), Code::Unavailable | Code::ResourceExhausted),
        "{e:?}"
    );
    ctl.create_snapshot(snapshotter_request("snapshot-on-b-2", &b.volume_id))
        .await
        .expect("node-b still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_pagination_and_expansion() {
    let c = Cluster::new().await;
    let mut ctl = c.ctl();
    let mut node = c.node("node-a");
    let base = provisioner_request("pvc-errors", 8 * MIB, "node-a", &["node-a"]);

    // (request, expected code) as the spec's error tables say.
    let mut no_name = base.clone();
    no_name.name.clear();
    let mut no_caps = base.clone();
    no_caps.volume_capabilities.clear();
    let mut rwx = base.clone();
    rwx.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter, "ext4")];
    let mut unknown_param = base.clone();
    unknown_param
        .parameters
        .insert("replicas".into(), "3".into());
    let mut bad_fs = base.clone();
    bad_fs.volume_capabilities = vec![mount_cap(Mode::SingleNodeWriter, "ntfs")];
    let mut missing_snapshot = base.clone();
    missing_snapshot.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "node-a/0123456789abcdef/7".into(),
            },
        )),
    });
    let mut foreign_snapshot = base.clone();
    foreign_snapshot.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "non-existing-snapshot-id".into(),
            },
        )),
    });
    let mut too_big = base.clone();
    too_big.capacity_range = Some(csi::CapacityRange {
        required_bytes: i64::MAX,
        limit_bytes: 0,
    });
    for (what, req, want) in [
        ("no name", no_name, Code::InvalidArgument),
        ("no capabilities", no_caps, Code::InvalidArgument),
        ("ReadWriteMany", rwx, Code::InvalidArgument),
        ("unknown parameter", unknown_param, Code::InvalidArgument),
        ("unsupported fs", bad_fs, Code::InvalidArgument),
        ("missing snapshot", missing_snapshot, Code::NotFound),
        ("foreign snapshot id", foreign_snapshot, Code::NotFound),
        ("too big", too_big, Code::OutOfRange),
    ] {
        assert_eq!(
            code(ctl.create_volume(req).await),
            want,
            "CreateVolume {what}"
        );
    }
    let mut rwx = base.clone();
    rwx.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter, "ext4")];
    let e = ctl.create_volume(rwx).await.expect_err("rwx");
    assert!(
        e.message().contains("NFS") && e.message().contains("frozen"),
        "{}",
        e.message()
    );

    let vol = ctl
        .create_volume(base.clone())
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v");
    assert_eq!(
        code(ctl.delete_volume(csi::DeleteVolumeRequest::default()).await),
        Code::InvalidArgument
    );
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "fake-vol-id".into(),
        ..Default::default()
    })
    .await
    .expect("unknown id: nothing to delete");
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "node-a/0123456789abcdef".into(),
        ..Default::default()
    })
    .await
    .expect("unknown key on a live node: nothing to delete");
    let vreq = |id: &str| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter, "")],
        ..Default::default()
    };
    assert_eq!(
        code(ctl.validate_volume_capabilities(vreq("fake-vol-id")).await),
        Code::NotFound
    );
    let ok = ctl
        .validate_volume_capabilities(vreq(&vol.volume_id))
        .await
        .expect("validate")
        .into_inner();
    assert!(ok.confirmed.is_some());
    let mut rox = vreq(&vol.volume_id);
    rox.volume_capabilities = vec![mount_cap(Mode::MultiNodeReaderOnly, "")];
    let no = ctl
        .validate_volume_capabilities(rox)
        .await
        .expect("validate")
        .into_inner();
    assert!(
        no.confirmed.is_none() && no.message.contains("NFS"),
        "{no:?}"
    );
    assert_eq!(
        code(
            ctl.list_volumes(csi::ListVolumesRequest {
                starting_token: "invalid-token".into(),
                ..Default::default()
            })
            .await
        ),
        Code::Aborted
    );
    assert_eq!(
        code(
            ctl.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: "testId".into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.create_snapshot(snapshotter_request("snapshot-x", "node-a/0123456789abcdef"))
                .await
        ),
        Code::NotFound
    );
    let mut bad_class = snapshotter_request("snapshot-x", &vol.volume_id);
    bad_class
        .parameters
        .insert("freeze".into(), "sometimes".into());
    assert_eq!(
        code(ctl.create_snapshot(bad_class).await),
        Code::InvalidArgument
    );
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: "reallyfakesnapshotid".into(),
        ..Default::default()
    })
    .await
    .expect("unknown snapshot: nothing to delete");
    let none = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: "none-exist-id".into(),
            ..Default::default()
        })
        .await
        .expect("list unknown")
        .into_inner();
    assert!(none.entries.is_empty());
    assert_eq!(
        code(
            ctl.get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: "node-a/0123456789abcdef/1".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );

    // Pagination: five snapshots, pages of two, with a delete between pages.
    let mut made = vec![];
    for i in 0..5 {
        let s = ctl
            .create_snapshot(snapshotter_request(
                &format!("snapshot-page-{i}"),
                &vol.volume_id,
            ))
            .await
            .expect("snap")
            .into_inner()
            .snapshot
            .expect("s");
        made.push(s.snapshot_id);
    }
    let p1 = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            max_entries: 2,
            ..Default::default()
        })
        .await
        .expect("p1")
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    assert!(!p1.next_token.is_empty());
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: p1.entries[1]
            .snapshot
            .as_ref()
            .expect("s")
            .snapshot_id
            .clone(),
        ..Default::default()
    })
    .await
    .expect("delete between pages");
    let p2 = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            starting_token: p1.next_token.clone(),
            ..Default::default()
        })
        .await
        .expect("p2")
        .into_inner();
    assert_eq!(p2.entries.len(), 3, "the rest, after the deleted cursor");
    assert!(p2.next_token.is_empty());
    let got = ctl
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: made[4].clone(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.snapshot.expect("s").snapshot_id, made[4]);

    // Expansion of an unstaged volume: exact size, and the file system grows on the node.
    let grown = ctl
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 24 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter, "ext4")),
            ..Default::default()
        })
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(grown.capacity_bytes, 24 * MIB);
    assert!(grown.node_expansion_required);
    assert_eq!(
        snapblk::engine::summary(&c.folder(&vol.volume_id))
            .expect("summary")
            .size,
        24 << 20
    );
    // The snapshots keep their size.
    let s0 = ctl
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: made[0].clone(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner()
        .snapshot
        .expect("s");
    assert_eq!(s0.size_bytes, 8 * MIB);
    assert_eq!(
        code(
            ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );

    // Capacity per topology segment.
    let cap_a = ctl
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(topo("node-a")),
            ..Default::default()
        })
        .await
        .expect("capacity")
        .into_inner();
    assert!(cap_a.available_capacity > 0);
    let cap_x = ctl
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(topo("node-x")),
            ..Default::default()
        })
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(cap_x.available_capacity, 0);

    // Node service: argument checks come before anything else; other nodes' volumes and
    // foreign IDs are NotFound.
    let stage =
        |id: &str, path: &str, cap: Option<csi::VolumeCapability>| csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path.into(),
            volume_capability: cap,
            ..Default::default()
        };
    let cap = Some(mount_cap(Mode::SingleNodeWriter, ""));
    assert_eq!(
        code(
            node.node_stage_volume(stage("", "/tmp/s", cap.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage(&vol.volume_id, "", cap.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage(&vol.volume_id, "/tmp/s", None))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage("node-b/0123456789abcdef", "/tmp/s", cap.clone()))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage("node-a/0123456789abcdef", "/tmp/s", cap.clone()))
                .await
        ),
        Code::NotFound
    );
    let stats = |id: &str, p: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: p.into(),
        staging_target_path: String::new(),
    };
    assert_eq!(
        code(node.node_get_volume_stats(stats("", "some/path")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_get_volume_stats(stats("fake-vol-id", "some/path"))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            node.node_get_volume_stats(stats(&vol.volume_id, "some/path"))
                .await
        ),
        Code::NotFound
    );
    let publish = csi::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: "/tmp/s".into(),
        target_path: c.dir.path().join("target").to_string_lossy().into_owned(),
        volume_capability: cap.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(node.node_publish_volume(publish).await),
        Code::FailedPrecondition
    );
    let unpublish = csi::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: c
            .dir
            .path()
            .join("never-published")
            .to_string_lossy()
            .into_owned(),
    };
    node.node_unpublish_volume(unpublish)
        .await
        .expect("unpublish of nothing is done");
    // DeleteVolume of a volume with snapshots keeps them; the listing drops the volume.
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let left = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .entries;
    assert_eq!(left.len(), 4);
}

/// All pages of a GetMetadataAllocated call, as (offset, size) pairs, with the number of
/// messages; every message checked for its type, capacity and max_results.
async fn allocated_pages(
    c: &Cluster,
    snapshot_id: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<(Vec<(i64, i64)>, usize), tonic::Status> {
    let mut client = SnapshotMetadataClient::new(unix_channel(
        &c.controller.as_ref().expect("controller").sock,
    ));
    let mut s = client
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: snapshot_id.into(),
            starting_offset,
            max_results,
            secrets: HashMap::new(),
        })
        .await?
        .into_inner();
    let (mut out, mut messages) = (vec![], 0);
    while let Some(m) = s.message().await? {
        assert_eq!(
            m.block_metadata_type,
            csi::BlockMetadataType::VariableLength as i32
        );
        assert_eq!(m.volume_capacity_bytes, 64 * MIB);
        assert!(max_results == 0 || m.block_metadata.len() <= max_results as usize);
        messages += 1;
        out.extend(
            m.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    }
    Ok((out, messages))
}

async fn delta_pages(
    c: &Cluster,
    base: &str,
    target: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Vec<(i64, i64)>, tonic::Status> {
    let mut client = SnapshotMetadataClient::new(unix_channel(
        &c.controller.as_ref().expect("controller").sock,
    ));
    let mut s = client
        .get_metadata_delta(csi::GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset,
            max_results,
            secrets: HashMap::new(),
        })
        .await?
        .into_inner();
    let mut out = vec![];
    while let Some(m) = s.message().await? {
        assert!(m.volume_capacity_bytes > 0);
        assert!(max_results == 0 || m.block_metadata.len() <= max_results as usize);
        out.extend(
            m.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    }
    Ok(out)
}

/// A backup tool's calls: the allocated ranges of a first snapshot, then the changes to
/// the next ones, including a snapshot of a volume restored from the first volume's
/// snapshot, through the controller into the node that owns them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_metadata_through_the_controller() {
    let c = Cluster::new().await;
    let mut ctl = c.ctl();
    let create = |name: &str, node: &str| provisioner_request(name, 64 * MIB, node, &[node]);
    let vol = ctl
        .create_volume(create("pvc-cbt-1", "node-a"))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    let folder = c.folder(&vol.volume_id);
    const K: i64 = 4096;
    write_volume(&folder, 0, &[1u8; 3 * 4096]);
    write_volume(&folder, 100 * 4096, &[2u8; 4096]);
    let snap = |name: &'static str, vol: String| {
        let mut ctl = c.ctl();
        async move {
            ctl.create_snapshot(snapshotter_request(name, &vol))
                .await
                .expect("snapshot")
                .into_inner()
                .snapshot
                .expect("snapshot")
                .snapshot_id
        }
    };
    let s1 = snap("snap-cbt-1", vol.volume_id.clone()).await;
    write_volume(&folder, 2 * 4096, &[3u8; 2 * 4096]);
    let s2 = snap("snap-cbt-2", vol.volume_id.clone()).await;

    // Full backup of s1, in one message and in pages of one range.
    let (all, n) = allocated_pages(&c, &s1, 0, 0).await.expect("allocated");
    assert_eq!(all, vec![(0, 3 * K), (100 * K, K)]);
    assert_eq!(n, 1);
    let (paged, n) = allocated_pages(&c, &s1, 0, 1).await.expect("paged");
    assert_eq!((paged, n), (all.clone(), 2));
    // Resumed after the first range: nothing before starting_offset.
    let (rest, _) = allocated_pages(&c, &s1, 3 * K, 0).await.expect("resumed");
    assert_eq!(rest, vec![(100 * K, K)]);
    let (mid, _) = allocated_pages(&c, &s1, K, 0).await.expect("mid-range");
    assert_eq!(mid, vec![(K, 2 * K), (100 * K, K)]);
    let (end, _) = allocated_pages(&c, &s1, 64 * MIB, 0)
        .await
        .expect("at the end");
    assert!(end.is_empty());

    // Incremental backup s1 -> s2.
    let d = delta_pages(&c, &s1, &s2, 0, 0).await.expect("delta");
    assert_eq!(d, vec![(2 * K, 2 * K)]);

    // A volume restored from s2, written and snapshotted: its snapshot descends from s1,
    // even once s2 (the restore's source) is deleted.
    let restored = ctl
        .create_volume(restore_request("pvc-cbt-restored", 64 * MIB, &s2, "node-a"))
        .await
        .expect("restore")
        .into_inner()
        .volume
        .expect("volume");
    write_volume(&c.folder(&restored.volume_id), 200 * 4096, &[4u8; 4096]);
    let r1 = snap("snap-cbt-r1", restored.volume_id.clone()).await;
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: s2.clone(),
        secrets: HashMap::new(),
    })
    .await
    .expect("delete s2");
    let d = delta_pages(&c, &s1, &r1, 0, 1)
        .await
        .expect("delta across the restore");
    assert_eq!(d, vec![(2 * K, 2 * K), (200 * K, K)]);

    // Errors a backup tool acts on.
    let other = ctl
        .create_volume(create("pvc-cbt-other", "node-a"))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    let foreign = snap("snap-cbt-other", other.volume_id.clone()).await;
    let e = delta_pages(&c, &foreign, &r1, 0, 0)
        .await
        .expect_err("foreign base");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("full backup"), "{}", e.message());
    let e = delta_pages(&c, &s2, &r1, 0, 0)
        .await
        .expect_err("deleted base");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(e.message().contains("full backup"), "{}", e.message());
    let on_b = ctl
        .create_volume(create("pvc-cbt-b", "node-b"))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    let sb = snap("snap-cbt-b", on_b.volume_id.clone()).await;
    let e = delta_pages(&c, &sb, &r1, 0, 0)
        .await
        .expect_err("another node");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert_eq!(
        code(delta_pages(&c, &s1, &s1, 0, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(allocated_pages(&c, &s1, 64 * MIB + K, 0).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(allocated_pages(&c, &s1, -1, 0).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(allocated_pages(&c, &s1, 0, -1).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(allocated_pages(&c, "", 0, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(allocated_pages(&c, "not-an-id", 0, 0).await),
        Code::NotFound
    );
    assert_eq!(code(allocated_pages(&c, &s2, 0, 0).await), Code::NotFound);
}

/// The external-snapshotter's CreateVolumeGroupSnapshot for a VolumeGroupSnapshot whose
/// label selector matched `volumes` (its name is `groupsnapshot-<uid>`).
fn group_request(name: &str, volumes: &[&str]) -> csi::CreateVolumeGroupSnapshotRequest {
    csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        parameters: HashMap::from([
            (
                "csi.storage.k8s.io/volumegroupsnapshot/name".into(),
                "db-consistent".into(),
            ),
            (
                "csi.storage.k8s.io/volumegroupsnapshot/namespace".into(),
                "db".into(),
            ),
            (
                "csi.storage.k8s.io/volumegroupsnapshotcontent/name".into(),
                "groupsnapcontent-x".into(),
            ),
        ]),
        ..Default::default()
    }
}

/// Every snapshot the driver lists.
async fn all_snapshots(c: &Cluster) -> Vec<csi::Snapshot> {
    c.ctl()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .expect("list snapshots")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshot_across_two_nodes() {
    let c = Cluster::new().await;
    let mut ctl = c.ctl();
    let mut group = GroupControllerClient::new(unix_channel(
        &c.controller.as_ref().expect("controller").sock,
    ));

    // The plugin says it has a GroupController, and the controller socket serves it.
    let caps = IdentityClient::new(unix_channel(
        &c.controller.as_ref().expect("controller").sock,
    ))
    .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
    .await
    .expect("caps")
    .into_inner()
    .capabilities;
    let group_service = csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(
            csi::plugin_capability::Service {
                r#type: csi::plugin_capability::service::Type::GroupControllerService as i32,
            },
        )),
    };
    assert!(caps.contains(&group_service), "{caps:?}");
    let gcaps = group
        .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
        .await
        .expect("group caps")
        .into_inner()
        .capabilities;
    assert_eq!(gcaps.len(), 1);

    // A database: data on node-a, WAL on node-b.
    let data = ctl
        .create_volume(provisioner_request(
            "pvc-data",
            16 * MIB,
            "node-a",
            &["node-a"],
        ))
        .await
        .expect("data")
        .into_inner()
        .volume
        .expect("v");
    let wal = ctl
        .create_volume(provisioner_request(
            "pvc-wal",
            16 * MIB,
            "node-b",
            &["node-b"],
        ))
        .await
        .expect("wal")
        .into_inner()
        .volume
        .expect("v");
    assert!(data.volume_id.starts_with("node-a/") && wal.volume_id.starts_with("node-b/"));
    write_volume(&c.folder(&data.volume_id), 0, &[1u8; 4096]);
    write_volume(&c.folder(&wal.volume_id), 4096, &[2u8; 4096]);
    let solo = ctl
        .create_snapshot(snapshotter_request("snapshot-solo", &data.volume_id))
        .await
        .expect("solo")
        .into_inner()
        .snapshot
        .expect("s");

    let name = "groupsnapshot-6f1c2d3e-0000-4000-8000-000000000001";
    let req = group_request(name, &[&data.volume_id, &wal.volume_id]);
    let resp = group
        .create_volume_group_snapshot(req.clone())
        .await
        .expect("group");
    let window: u64 = resp
        .metadata()
        .get("snapblk-freeze-window-us")
        .expect("window header")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!(window > 0);
    let g = resp.into_inner().group_snapshot.expect("group");
    assert!(
        g.group_snapshot_id.starts_with("group:"),
        "{}",
        g.group_snapshot_id
    );
    assert!(g.group_snapshot_id.len() <= 128);
    assert!(g.ready_to_use);
    assert!(g.creation_time.is_some());
    assert_eq!(g.snapshots.len(), 2);
    let mut sources: Vec<&str> = g
        .snapshots
        .iter()
        .map(|s| s.source_volume_id.as_str())
        .collect();
    sources.sort();
    assert_eq!(
        sources,
        vec![data.volume_id.as_str(), wal.volume_id.as_str()]
    );
    for s in &g.snapshots {
        assert_eq!(s.group_snapshot_id, g.group_snapshot_id);
        assert!(s.ready_to_use);
    }
    let member_ids: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();

    // Writes after the group do not reach its members; each member restores on its node.
    write_volume(&c.folder(&data.volume_id), 0, &[9u8; 4096]);
    for s in &g.snapshots {
        let node = s.source_volume_id.split('/').next().expect("node");
        let v = ctl
            .create_volume(restore_request(
                &format!("pvc-restore-{node}"),
                16 * MIB,
                &s.snapshot_id,
                node,
            ))
            .await
            .expect("restore")
            .into_inner()
            .volume
            .expect("v");
        assert!(v.volume_id.starts_with(&format!("{node}/")));
        let (off, byte) = if node == "node-a" {
            (0, 1u8)
        } else {
            (4096, 2u8)
        };
        assert_eq!(
            read_volume(&c.folder(&v.volume_id), off, 4096),
            vec![byte; 4096]
        );
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id,
            ..Default::default()
        })
        .await
        .expect("delete restore");
    }

    // Idempotent by name: the snapshotter retries, in any order of the volumes.
    let again = group
        .create_volume_group_snapshot(group_request(name, &[&wal.volume_id, &data.volume_id]))
        .await
        .expect("retry")
        .into_inner()
        .group_snapshot
        .expect("group");
    assert_eq!(again, g);
    assert_eq!(
        code(
            group
                .create_volume_group_snapshot(group_request(name, &[&data.volume_id]))
                .await
        ),
        Code::AlreadyExists
    );
    // Members are listed with their group; the name pattern is kept for members.
    let listed = all_snapshots(&c).await;
    assert_eq!(listed.len(), 3);
    assert_eq!(
        listed
            .iter()
            .filter(|s| s.group_snapshot_id == g.group_snapshot_id)
            .count(),
        2
    );
    let member_name = format!("vgs-{}-0123456789abcdef", &g.group_snapshot_id[6..]);
    assert_eq!(
        code(
            ctl.create_snapshot(snapshotter_request(&member_name, &data.volume_id))
                .await
        ),
        Code::InvalidArgument
    );

    // Get: by ID with the members the CO knows; a list that does not match is refused.
    let get = |ids: Vec<String>, gid: &str| csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: gid.into(),
        snapshot_ids: ids,
        ..Default::default()
    };
    let got = group
        .get_volume_group_snapshot(get(member_ids.clone(), &g.group_snapshot_id))
        .await
        .expect("get")
        .into_inner()
        .group_snapshot
        .expect("group");
    assert_eq!(got, g);
    assert_eq!(
        code(
            group
                .get_volume_group_snapshot(get(
                    vec![member_ids[0].clone(), solo.snapshot_id.clone()],
                    &g.group_snapshot_id
                ))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            group
                .get_volume_group_snapshot(get(vec![member_ids[0].clone()], &g.group_snapshot_id))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            group
                .get_volume_group_snapshot(get(vec!["not-an-id".into()], &g.group_snapshot_id))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            group
                .get_volume_group_snapshot(get(vec![], "group:0123"))
                .await
        ),
        Code::NotFound
    );
    let other = format!("group:{}", "0".repeat(32));
    assert_eq!(
        code(group.get_volume_group_snapshot(get(vec![], &other)).await),
        Code::NotFound
    );
    assert_eq!(
        code(group.get_volume_group_snapshot(get(vec![], "")).await),
        Code::InvalidArgument
    );

    // Delete: a mismatched list is refused and deletes nothing; then the group goes, and
    // deleting it again (or an ID this driver did not make) is a success.
    let del = |ids: Vec<String>, gid: &str| csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: gid.into(),
        snapshot_ids: ids,
        ..Default::default()
    };
    assert_eq!(
        code(
            group
                .delete_volume_group_snapshot(del(
                    vec![solo.snapshot_id.clone()],
                    &g.group_snapshot_id
                ))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(all_snapshots(&c).await.len(), 3);
    group
        .delete_volume_group_snapshot(del(member_ids.clone(), &g.group_snapshot_id))
        .await
        .expect("delete");
    group
        .delete_volume_group_snapshot(del(member_ids.clone(), &g.group_snapshot_id))
        .await
        .expect("delete again");
    group
        .delete_volume_group_snapshot(del(vec![], "some-other-id"))
        .await
        .expect("foreign id");
    let left = all_snapshots(&c).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].snapshot_id, solo.snapshot_id);
    assert_eq!(
        code(
            group
                .get_volume_group_snapshot(get(member_ids.clone(), &g.group_snapshot_id))
                .await
        ),
        Code::NotFound
    );

    // Refusals before anything is frozen.
    let bad = |f: &dyn Fn(&mut csi::CreateVolumeGroupSnapshotRequest)| {
        let mut r = group_request("groupsnapshot-bad", &[&data.volume_id, &wal.volume_id]);
        f(&mut r);
        r
    };
    for (r, want) in [
        (bad(&|r| r.name.clear()), Code::InvalidArgument),
        (bad(&|r| r.source_volume_ids.clear()), Code::InvalidArgument),
        (
            bad(&|r| {
                r.parameters.insert("freezeTimeout".into(), "1h".into());
            }),
            Code::InvalidArgument,
        ),
        (
            bad(&|r| {
                r.parameters.insert("freeze".into(), "none".into());
            }),
            Code::InvalidArgument,
        ),
        (
            bad(&|r| r.source_volume_ids[1] = r.source_volume_ids[0].clone()),
            Code::InvalidArgument,
        ),
        (
            bad(&|r| r.source_volume_ids[1] = "no-such-volume".into()),
            Code::NotFound,
        ),
    ] {
        assert_eq!(code(group.create_volume_group_snapshot(r).await), want);
    }

    // Failures mid-way leave no snapshot behind: a member that does not exist (its node
    // refuses to freeze it, after node-a froze its own)...
    assert_eq!(
        code(
            group
                .create_volume_group_snapshot(group_request(
                    "groupsnapshot-missing",
                    &[&data.volume_id, "node-b/00000000deadbeef"]
                ))
                .await
        ),
        Code::NotFound
    );
    // ... a window that cannot fit in its deadline ...
    let mut tight = group_request("groupsnapshot-tight", &[&data.volume_id, &wal.volume_id]);
    tight
        .parameters
        .insert("freezeTimeout".into(), "1ms".into());
    assert_eq!(
        code(group.create_volume_group_snapshot(tight).await),
        Code::DeadlineExceeded
    );
    assert_eq!(all_snapshots(&c).await.len(), 1);
    // ... and a node that does not answer (not registered, or silent past its timeout).
    assert_eq!(
        code(
            group
                .create_volume_group_snapshot(group_request(
                    "groupsnapshot-node-down",
                    &[&data.volume_id, "node-c/0123456789abcdef"]
                ))
                .await
        ),
        Code::Unavailable
    );
    let left = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: data.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list node-a")
        .into_inner()
        .entries;
    assert_eq!(left.len(), 1, "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_agent_freeze_and_thaw() {
    let c = Cluster::new().await;
    let vol = c
        .ctl()
        .create_volume(provisioner_request(
            "pvc-f",
            16 * MIB,
            "node-a",
            &["node-a"],
        ))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("v");
    let key = vol.volume_id.split_once('/').expect("id").1.to_string();
    let ch = Channel::from_shared(c.nodes["node-a"].agent_addr.clone())
        .expect("uri")
        .connect_lazy();
    let mut agent = NodeAgentClient::with_interceptor(ch, c.token.bearer());
    let freeze = |volume_key: &str, timeout_ms| pb::FreezeVolumeRequest {
        volume_key: volume_key.into(),
        timeout_ms,
        reason: "test".into(),
    };
    // Not staged: nothing to freeze, no handle.
    let f = agent
        .freeze_volume(freeze(&key, 1000))
        .await
        .expect("freeze")
        .into_inner();
    assert!(f.handle.is_empty() && !f.staged && f.frozen_mounts.is_empty());
    assert_eq!(
        code(agent.freeze_volume(freeze(&key, 0)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(agent.freeze_volume(freeze(&key, 301_000)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(agent.freeze_volume(freeze("00000000deadbeef", 1000)).await),
        Code::NotFound
    );
    // A handle the agent does not hold (its deadline passed, or it restarted) expired.
    let t = agent
        .thaw_volume(pb::ThawVolumeRequest {
            handle: "0011223344556677".into(),
        })
        .await
        .expect("thaw")
        .into_inner();
    assert!(t.expired);
    assert_eq!(
        code(agent.thaw_volume(pb::ThawVolumeRequest::default()).await),
        Code::InvalidArgument
    );
}

/// `GET`s (or sends `method` to) `path` on `addr` over plain HTTP/1.1: the status code
/// and the body.
async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut raw))
        .await
        .expect("answered in time")
        .expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP reply");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// The value of series `series` (name and labels, exactly) in OpenMetrics `text`.
fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_metrics_count_rpcs_by_method_and_code() {
    let c = Cluster::new().await;
    let addr = c.controller.as_ref().expect("controller").metrics;
    let created = r#"snapblk_csi_rpc_requests_total{service="csi.v1.Controller",method="CreateVolume",code="OK"}"#;
    let refused = r#"snapblk_csi_rpc_requests_total{service="csi.v1.Controller",method="CreateVolume",code="InvalidArgument"}"#;
    let (status, before) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "{before}");
    assert!(before.ends_with("# EOF\n"), "{before}");
    // Registration asked for the capacity at least once, through the same socket.
    assert!(
        series_value(
            &before,
            r#"snapblk_csi_rpc_requests_total{service="csi.v1.Controller",method="GetCapacity",code="OK"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{before}"
    );
    assert_eq!(series_value(&before, created), None, "{before}");

    let mut ctl = c.ctl();
    let all = ["node-a", "node-b"];
    let req = provisioner_request(
        "pvc-4b1e7c1a-0000-4000-8000-0000000000aa",
        16 * MIB,
        "node-a",
        &all,
    );
    for _ in 0..3 {
        ctl.create_volume(req.clone()).await.expect("create");
    }
    for _ in 0..2 {
        let mut nameless = req.clone();
        nameless.name.clear();
        assert_eq!(
            code(ctl.create_volume(nameless).await),
            Code::InvalidArgument
        );
    }
    let mut id = IdentityClient::new(unix_channel(&c.controller.as_ref().expect("ctl").sock));
    id.probe(csi::ProbeRequest {}).await.expect("probe");

    let (status, after) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(series_value(&after, created), Some(3.0), "{after}");
    assert_eq!(series_value(&after, refused), Some(2.0), "{after}");
    assert_eq!(
        series_value(
            &after,
            r#"snapblk_csi_rpc_duration_seconds_count{service="csi.v1.Controller",method="CreateVolume",code="OK"}"#
        ),
        Some(3.0),
        "{after}"
    );
    assert_eq!(
        series_value(
            &after,
            r#"snapblk_csi_rpc_requests_total{service="csi.v1.Identity",method="Probe",code="OK"}"#
        ),
        Some(1.0),
        "{after}"
    );
    let sum = series_value(
        &after,
        r#"snapblk_csi_rpc_duration_seconds_sum{service="csi.v1.Controller",method="CreateVolume",code="OK"}"#,
    )
    .expect("a latency sum");
    assert!(sum > 0.0 && sum < 60.0, "{sum}");
    // A controller has no volumes of its own.
    assert!(!after.contains("snapblk_volume_"), "{after}");

    // Only GET /metrics.
    assert_eq!(http(addr, "GET", "/").await.0, 404);
    assert_eq!(http(addr, "GET", "/metrics/x").await.0, 404);
    assert_eq!(http(addr, "POST", "/metrics").await.0, 405);
}
