//! `snapblk csi ...`: the CSI driver's processes (controller, node plugin, or both).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use tokio::sync::watch;

use crate::csi::agent;
use crate::csi::auth::Token;
use crate::csi::controller::Controller;
use crate::csi::identity::{Identity, Role};
use crate::csi::metrics::{MetricsSources, RpcMetrics};
use crate::csi::registry::Registry;
use crate::csi::server::{self, NodeOptions};
use crate::csi::snapshot_metadata::{MetadataStyle, SnapshotMetadata};
use crate::csi::transport;

/// The CSI driver's processes.
#[derive(Debug, Subcommand)]
pub enum CsiCommand {
    /// The controller: one per cluster (a Deployment beside the external-provisioner,
    /// -snapshotter and -resizer sidecars). Decides where volumes go and sends the work to
    /// the node that owns them; keeps no state (see docs/csi.md).
    Controller(ControllerArgs),
    /// The node plugin: one per node (a privileged DaemonSet). Serves the node's volumes as
    /// ublk devices, stages and publishes them for the kubelet, and does the controller's
    /// work on the node's volumes.
    Node(NodeArgs),
    /// Controller and node plugin in one process, for a single-node cluster or a test.
    AllInOne(AllInOneArgs),
}

/// What every CSI process takes.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// The CSI endpoint to serve (a Unix socket), shared with the sidecars or the kubelet.
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// The driver's name, as in the CSIDriver object and the StorageClass's provisioner.
    #[arg(long, default_value = "csi.snapblk.io")]
    pub driver_name: String,
    /// Serve Prometheus metrics over HTTP at this address (GET /metrics, OpenMetrics
    /// text), e.g. 0.0.0.0:9812: the CSI calls answered and, on a node, every served
    /// volume's requests, snapshots, freeze windows and space (see docs/metrics.md)
    /// [default: no metrics endpoint].
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// Binds the metrics endpoint's listener, if one was asked for.
async fn metrics_listener(common: &CommonArgs) -> Result<Option<tokio::net::TcpListener>, String> {
    match common.metrics_addr {
        Some(addr) => server::listen(addr, "--metrics-addr").await.map(Some),
        None => Ok(None),
    }
}

/// Arguments of `csi controller`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  snapblk csi controller --endpoint unix:///csi/csi.sock --listen 0.0.0.0:9811 \\\n      --token-file /etc/snapblk/token\n\nNode plugins register with the controller at --listen and must have the same token."
)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Where node plugins send their heartbeats (the controller's Service port).
    #[arg(long, default_value = "0.0.0.0:9811")]
    pub listen: SocketAddr,
    /// File holding the token shared by the controller and every node plugin (a mounted
    /// Secret; at least 16 characters).
    #[arg(long, value_name = "PATH")]
    pub token_file: PathBuf,
    /// How SnapshotMetadata answers cut ranges: `variable` (VARIABLE_LENGTH, maximal
    /// runs) or `fixed` (FIXED_LENGTH, one range per block of the volume).
    #[arg(long, value_enum, default_value_t = MetadataStyle::Variable)]
    pub snapshot_metadata_type: MetadataStyle,
}

/// What a node plugin takes (also the all-in-one process).
#[derive(Debug, Args)]
pub struct NodeCommonArgs {
    /// This node's ID: the Kubernetes node name (from the downward API, spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_id: String,
    /// Folder for the node's volumes, daemon records, control sockets and logs. It must
    /// persist across plugin restarts (a hostPath).
    #[arg(long, default_value = "/var/lib/snapblk")]
    pub state_dir: PathBuf,
    /// Most volumes the kubelet may stage on this node (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_volumes: i64,
}

/// Arguments of `csi node`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  snapblk csi node --endpoint unix:///csi/csi.sock --node-id \"$NODE_NAME\" \\\n      --agent-listen 0.0.0.0:9810 --agent-address \"http://$POD_IP:9810\" \\\n      --controller http://snapblk-controller.snapblk.svc:9811 --token-file /etc/snapblk/token\n\nVolume daemons outlive the plugin: restarting it does not disturb mounted volumes."
)]
pub struct NodeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub node: NodeCommonArgs,
    /// Where the node agent listens for the controller.
    #[arg(long, default_value = "0.0.0.0:9810")]
    pub agent_listen: SocketAddr,
    /// How the controller reaches this node's agent (sent with every heartbeat).
    #[arg(long, value_name = "URL")]
    pub agent_address: String,
    /// The controller's registry, e.g. http://snapblk-controller.snapblk.svc:9811.
    #[arg(long, value_name = "URL")]
    pub controller: String,
    /// File holding the token shared with the controller.
    #[arg(long, value_name = "PATH")]
    pub token_file: PathBuf,
}

/// Arguments of `csi all-in-one`.
#[derive(Debug, Args)]
pub struct AllInOneArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub node: NodeCommonArgs,
    /// How SnapshotMetadata answers cut ranges: `variable` (VARIABLE_LENGTH, maximal
    /// runs) or `fixed` (FIXED_LENGTH, one range per block of the volume).
    #[arg(long, value_enum, default_value_t = MetadataStyle::Variable)]
    pub snapshot_metadata_type: MetadataStyle,
}

fn node_options(common: &CommonArgs, n: &NodeCommonArgs) -> anyhow::Result<NodeOptions> {
    Ok(NodeOptions {
        node_id: n.node_id.clone(),
        driver_name: common.driver_name.clone(),
        state_dir: n.state_dir.clone(),
        exe: std::env::current_exe().map_err(|e| {
            anyhow::anyhow!("cannot find the snapblk binary for volume daemons: {e}")
        })?,
        max_volumes: n.max_volumes,
    })
}

fn check_driver_name(name: &str) -> anyhow::Result<()> {
    // The CSI specification: at most 63 characters, DNS-like, starting and ending with
    // an alphanumeric character.
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    anyhow::ensure!(
        ok,
        "driver name {name:?}: use at most 63 letters, digits, '-', '.' and '_', starting and ending with a letter or digit"
    );
    Ok(())
}

/// Runs a `csi` command until SIGTERM or SIGINT.
pub fn run(cmd: CsiCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (tx, shutdown) = watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch SIGTERM");
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stopping (volume daemons keep serving)");
            let _ = tx.send(true);
        });
        let result = match cmd {
            CsiCommand::Controller(a) => controller(a, shutdown).await,
            CsiCommand::Node(a) => node(a, shutdown).await,
            CsiCommand::AllInOne(a) => all_in_one(a, shutdown).await,
        };
        result.map_err(|e| anyhow::anyhow!(e))
    })
}

async fn controller(a: ControllerArgs, shutdown: server::Shutdown) -> Result<(), String> {
    check_driver_name(&a.common.driver_name).map_err(|e| e.to_string())?;
    let socket = transport::socket_path(&a.common.endpoint)?;
    let token = Token::from_file(&a.token_file)?;
    let registry = Arc::new(Registry::new(token.clone()));
    let listener = server::listen(a.listen, "--listen").await?;
    let identity = Identity {
        driver_name: a.common.driver_name.clone(),
        role: Role::Controller,
    };
    let ctl = Controller {
        driver_name: a.common.driver_name.clone(),
        registry: registry.clone(),
    };
    let meta = SnapshotMetadata {
        registry: registry.clone(),
        style: a.snapshot_metadata_type,
    };
    let metrics = metrics_listener(&a.common).await?;
    let rpc = metrics.as_ref().map(|_| Arc::new(RpcMetrics::default()));
    let sources = MetricsSources {
        rpc: rpc.clone(),
        node: None,
    };
    let reg = server::serve_registry(listener, registry, token, shutdown.clone());
    let csi = server::serve_csi(
        &socket,
        identity,
        Some(ctl),
        Some(meta),
        None,
        rpc,
        shutdown.clone(),
    );
    let m = server::maybe_serve_metrics(metrics, sources, shutdown);
    let (r, c, m) = tokio::join!(reg, csi, m);
    r.and(c).and(m)
}

async fn node(a: NodeArgs, shutdown: server::Shutdown) -> Result<(), String> {
    check_driver_name(&a.common.driver_name).map_err(|e| e.to_string())?;
    let socket = transport::socket_path(&a.common.endpoint)?;
    let token = Token::from_file(&a.token_file)?;
    let o = node_options(&a.common, &a.node).map_err(|e| e.to_string())?;
    if let Some(why) = agent::ublk_unready() {
        tracing::warn!("{why}; Probe fails until it is fixed");
    }
    let parts = server::node_parts(&o)?;
    let listener = server::listen(a.agent_listen, "--agent-listen").await?;
    let metrics = metrics_listener(&a.common).await?;
    let rpc = metrics.as_ref().map(|_| Arc::new(RpcMetrics::default()));
    let sources = MetricsSources {
        rpc: rpc.clone(),
        node: Some(server::node_metrics(&o, &parts)),
    };
    let beat = tokio::spawn(agent::heartbeat(
        a.controller.clone(),
        o.node_id.clone(),
        a.agent_address.clone(),
        token.clone(),
    ));
    let identity = Identity {
        driver_name: o.driver_name.clone(),
        role: Role::Node,
    };
    let ag = server::serve_agent(listener, parts.agent, token, shutdown.clone());
    let csi = server::serve_csi(
        &socket,
        identity,
        None,
        None,
        Some(parts.node),
        rpc,
        shutdown.clone(),
    );
    let m = server::maybe_serve_metrics(metrics, sources, shutdown);
    let (r, c, m) = tokio::join!(ag, csi, m);
    beat.abort();
    r.and(c).and(m)
}

async fn all_in_one(a: AllInOneArgs, shutdown: server::Shutdown) -> Result<(), String> {
    check_driver_name(&a.common.driver_name).map_err(|e| e.to_string())?;
    let socket = transport::socket_path(&a.common.endpoint)?;
    let o = node_options(&a.common, &a.node).map_err(|e| e.to_string())?;
    if let Some(why) = agent::ublk_unready() {
        tracing::warn!("{why}; Probe fails until it is fixed");
    }
    let metrics = metrics_listener(&a.common).await?;
    server::run_all_in_one(&socket, &o, a.snapshot_metadata_type, metrics, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names() {
        check_driver_name("csi.snapblk.io").expect("default");
        for bad in ["", "-x", "x-", "a b", &"a".repeat(64)] {
            assert!(check_driver_name(bad).is_err(), "{bad:?}");
        }
    }
}
