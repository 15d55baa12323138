//! Putting the services together: the CSI socket (Identity with Controller and/or Node),
//! the node's NodeAgent and the controller's Registry on TCP, the metrics endpoint, and the
//! all-in-one process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use super::agent::Agent;
use super::auth::Token;
use super::controller::Controller;
use super::daemon::{Daemons, Layout};
use super::group_controller::GroupController;
use super::identity::{Identity, Role};
use super::metrics::{MetricsSources, NodeMetrics, RpcMetrics, RpcMetricsLayer, CONTENT_TYPE};
use super::node::Node;
use super::oplock::OpLocks;
use super::proto::csi::{
    controller_server::ControllerServer, group_controller_server::GroupControllerServer,
    identity_server::IdentityServer, node_server::NodeServer,
    snapshot_metadata_server::SnapshotMetadataServer,
};
use super::proto::node::{node_agent_server::NodeAgentServer, registry_server::RegistryServer};
use super::registry::{Registry, RegistryService, HEARTBEAT_INTERVAL};
use super::snapshot_metadata::{MetadataStyle, SnapshotMetadata};
use super::store::Store;
use super::transport;

/// Ends the servers when it turns true.
pub type Shutdown = watch::Receiver<bool>;

async fn wait(mut s: Shutdown) {
    while !*s.borrow() {
        if s.changed().await.is_err() {
            // The sender is gone: nobody can ask for a shutdown any more.
            std::future::pending::<()>().await;
        }
    }
}

/// What a node plugin needs to know about itself.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub node_id: String,
    pub driver_name: String,
    /// Holds the volume folders, daemon records, sockets and logs.
    pub state_dir: PathBuf,
    /// The snapblk binary the volume daemons run.
    pub exe: PathBuf,
    pub max_volumes: i64,
}

/// A node plugin's services, ready to serve.
pub struct NodeParts {
    pub node: Node,
    pub agent: Agent,
}

/// Opens the node's state and adopts the volume daemons that outlived a previous plugin.
pub fn node_parts(o: &NodeOptions) -> Result<NodeParts, String> {
    if !super::ids::is_plain_name(&o.node_id, super::ids::MAX_NODE_LEN) {
        return Err(format!(
            "node id {:?}: use 1 to {} characters of letters, digits, '.', '_' and '-' (the Kubernetes node name)",
            o.node_id,
            super::ids::MAX_NODE_LEN
        ));
    }
    let layout = Layout::new(&o.state_dir);
    let daemons = Arc::new(Daemons::new(o.exe.clone(), layout.clone()));
    let ops = OpLocks::default();
    let store = Arc::new(
        Store::open(layout, daemons.clone(), ops.clone()).map_err(|e| e.message().to_string())?,
    );
    for note in daemons.adopt() {
        tracing::info!(node = %o.node_id, "{note}");
    }
    supervise(Arc::downgrade(&daemons), ops.clone());
    Ok(NodeParts {
        node: Node {
            node_id: o.node_id.clone(),
            driver_name: o.driver_name.clone(),
            max_volumes: o.max_volumes,
            store: store.clone(),
            daemons,
            ops,
        },
        agent: Agent {
            node_id: o.node_id.clone(),
            store,
        },
    })
}

/// How often the node plugin looks for volume daemons that died.
const SUPERVISION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Watches the volume daemons from a thread of its own until the node plugin's services
/// are dropped.
fn supervise(daemons: std::sync::Weak<Daemons>, ops: OpLocks) {
    let spawned = std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || loop {
            std::thread::sleep(SUPERVISION_INTERVAL);
            let Some(d) = daemons.upgrade() else { return };
            for note in d.supervise(&ops) {
                tracing::warn!("{note}");
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the volume daemon supervisor: dead daemons are taken over only at the next stage");
    }
}

/// Serves the CSI services on the Unix socket at `socket` until `shutdown` (the
/// SnapshotMetadata service beside the Controller: one endpoint for the whole driver),
/// counting every call in `rpc_metrics` when given.
pub async fn serve_csi(
    socket: &Path,
    identity: Identity,
    controller: Option<Controller>,
    snapshot_metadata: Option<SnapshotMetadata>,
    node: Option<Node>,
    rpc_metrics: Option<Arc<RpcMetrics>>,
    shutdown: Shutdown,
) -> Result<(), String> {
    let incoming = transport::bind_unix(socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    tracing::info!(socket = %socket.display(), driver = %identity.driver_name, role = ?identity.role, "CSI endpoint listening");
    // The GroupController goes wherever the Controller goes: same nodes, same registry.
    let group = controller
        .as_ref()
        .map(|c| GroupController::new(c.registry.clone()));
    let result = Server::builder()
        .layer(RpcMetricsLayer::new(rpc_metrics))
        .add_service(IdentityServer::new(identity))
        .add_optional_service(group.map(GroupControllerServer::new))
        .add_optional_service(controller.map(ControllerServer::new))
        .add_optional_service(snapshot_metadata.map(SnapshotMetadataServer::new))
        .add_optional_service(node.map(NodeServer::new))
        .serve_with_incoming_shutdown(incoming, wait(shutdown))
        .await;
    let _ = std::fs::remove_file(socket);
    result.map_err(|e| format!("CSI endpoint {}: {e}", socket.display()))
}

/// Serves the node's NodeAgent on `listener` (token required) until `shutdown`.
pub async fn serve_agent(
    listener: TcpListener,
    agent: Agent,
    token: Token,
    shutdown: Shutdown,
) -> Result<(), String> {
    let addr = listener.local_addr().ok();
    tracing::info!(address = ?addr, "node agent listening");
    Server::builder()
        .add_service(NodeAgentServer::with_interceptor(agent, token.checker()))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), wait(shutdown))
        .await
        .map_err(|e| format!("node agent {addr:?}: {e}"))
}

/// Serves the node's NodeAgent on the Unix socket at `path` (token required): for a
/// controller on the same machine, with no port to open.
pub async fn serve_agent_unix(
    path: &Path,
    agent: Agent,
    token: Token,
    shutdown: Shutdown,
) -> Result<(), String> {
    let incoming = transport::bind_unix(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    // Owner only: the socket is the node's whole control.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(socket = %path.display(), "node agent listening");
    let result = Server::builder()
        .add_service(NodeAgentServer::with_interceptor(agent, token.checker()))
        .serve_with_incoming_shutdown(incoming, wait(shutdown))
        .await;
    let _ = std::fs::remove_file(path);
    result.map_err(|e| format!("node agent {}: {e}", path.display()))
}

/// Serves the controller's Registry on `listener` (token required) until `shutdown`.
pub async fn serve_registry(
    listener: TcpListener,
    registry: Arc<Registry>,
    token: Token,
    shutdown: Shutdown,
) -> Result<(), String> {
    let addr = listener.local_addr().ok();
    tracing::info!(address = ?addr, "node registry listening");
    Server::builder()
        .add_service(RegistryServer::with_interceptor(
            RegistryService(registry),
            token.checker(),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), wait(shutdown))
        .await
        .map_err(|e| format!("registry {addr:?}: {e}"))
}

/// The metrics of a node plugin: its volumes, found through `parts`.
pub fn node_metrics(o: &NodeOptions, parts: &NodeParts) -> NodeMetrics {
    NodeMetrics {
        node_id: o.node_id.clone(),
        daemons: parts.node.daemons.clone(),
        volumes_dir: Layout::new(&o.state_dir).volumes,
    }
}

/// Serves `GET /metrics` (OpenMetrics text made of `sources` at each scrape) over HTTP on
/// `listener` until `shutdown`; any other path is 404.
pub async fn serve_metrics(
    listener: TcpListener,
    sources: MetricsSources,
    shutdown: Shutdown,
) -> Result<(), String> {
    use axum::extract::State;
    use axum::http::{header, StatusCode};
    use axum::response::{IntoResponse, Response};

    async fn scrape(State(sources): State<Arc<MetricsSources>>) -> Response {
        match sources.render().await {
            Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the metrics could not be encoded\n",
            )
                .into_response(),
        }
    }
    async fn not_found() -> (StatusCode, &'static str) {
        (
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        )
    }

    let addr = listener.local_addr().ok();
    tracing::info!(address = ?addr, "metrics endpoint listening");
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .fallback(not_found)
        .with_state(Arc::new(sources));
    axum::serve(listener, app)
        .with_graceful_shutdown(wait(shutdown))
        .await
        .map_err(|e| format!("metrics endpoint {addr:?}: {e}"))
}

/// Serves the metrics of `sources` on `listener` when there is one; returns at once
/// otherwise.
pub async fn maybe_serve_metrics(
    listener: Option<TcpListener>,
    sources: MetricsSources,
    shutdown: Shutdown,
) -> Result<(), String> {
    match listener {
        Some(l) => serve_metrics(l, sources, shutdown).await,
        None => Ok(()),
    }
}

/// Binds a TCP listener, with a message that names the flag on failure.
pub async fn listen(addr: SocketAddr, flag: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{flag} {addr}: {e}"))
}

/// The controller and the node of a single-node cluster in one process: the node's agent
/// listens on a Unix socket in the state folder, with a token made for the occasion, and
/// registers itself with the controller directly.
pub async fn run_all_in_one(
    socket: &Path,
    o: &NodeOptions,
    metadata_style: MetadataStyle,
    metrics: Option<TcpListener>,
    shutdown: Shutdown,
) -> Result<(), String> {
    let parts = node_parts(o)?;
    let rpc = metrics.as_ref().map(|_| Arc::new(RpcMetrics::default()));
    let sources = MetricsSources {
        rpc: rpc.clone(),
        node: Some(node_metrics(o, &parts)),
    };
    let token = Token::random();
    let agent_sock = o.state_dir.join("agent.sock");
    let registry = Arc::new(Registry::new(token.clone()));
    let agent_uri = format!("unix://{}", agent_sock.display());
    registry
        .heard(&o.node_id, &agent_uri, env!("CARGO_PKG_VERSION"))
        .map_err(|e| e.message().to_string())?;
    let reg = registry.clone();
    let node_id = o.node_id.clone();
    let mut stop = shutdown.clone();
    let beat = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
                _ = stop.changed() => return,
            }
            let _ = reg.heard(&node_id, &agent_uri, env!("CARGO_PKG_VERSION"));
        }
    });
    let identity = Identity {
        driver_name: o.driver_name.clone(),
        role: Role::AllInOne,
    };
    let snapshot_metadata = SnapshotMetadata {
        registry: registry.clone(),
        style: metadata_style,
    };
    let controller = Controller {
        driver_name: o.driver_name.clone(),
        registry,
    };
    let agent = serve_agent_unix(&agent_sock, parts.agent, token, shutdown.clone());
    let csi = serve_csi(
        socket,
        identity,
        Some(controller),
        Some(snapshot_metadata),
        Some(parts.node),
        rpc,
        shutdown.clone(),
    );
    let m = maybe_serve_metrics(metrics, sources, shutdown);
    let (a, c, m) = tokio::join!(agent, csi, m);
    beat.abort();
    a.and(c).and(m)
}
