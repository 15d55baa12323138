//! The controller's view of the nodes: which node plugins are alive and where their
//! NodeAgent answers, learnt from their heartbeats. Nothing is stored: a restarted
//! controller knows every live node again after one heartbeat interval, and until then
//! answers UNAVAILABLE for the nodes it has not heard from (the sidecars retry).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::auth::{Bearer, Token};
use super::ids::{is_plain_name, MAX_NODE_LEN};
use super::proto::node as pb;
use super::proto::node::node_agent_client::NodeAgentClient;

/// A client of one node's NodeAgent, with the token on every call.
pub type AgentClient = NodeAgentClient<InterceptedService<Channel, Bearer>>;

/// How often nodes send heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// A node not heard from for this long is taken as down.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(35);
/// Longest a call to a node may take (a snapshot's freeze deadline is 10 s by default,
/// at most 300 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(330);

struct NodeEntry {
    address: String,
    version: String,
    last_seen: Instant,
    client: AgentClient,
}

/// The live nodes.
pub struct Registry {
    token: Token,
    nodes: RwLock<BTreeMap<String, NodeEntry>>,
}

impl Registry {
    /// An empty registry whose clients authenticate with `token`.
    pub fn new(token: Token) -> Registry {
        Registry {
            token,
            nodes: RwLock::default(),
        }
    }

    /// Records a heartbeat of `node` reachable at `address`.
    pub fn heard(&self, node: &str, address: &str, version: &str) -> Result<(), Status> {
        if !is_plain_name(node, MAX_NODE_LEN) {
            return Err(Status::invalid_argument(format!(
                "node id {node:?}: use 1 to {MAX_NODE_LEN} characters of letters, digits, '.', '_' and '-'"
            )));
        }
        let mut nodes = self.nodes.write();
        if let Some(e) = nodes.get_mut(node) {
            if e.address == address {
                e.last_seen = Instant::now();
                e.version = version.to_string();
                return Ok(());
            }
        }
        let channel = match address.strip_prefix("unix://") {
            // An agent in the same process or on the same machine.
            Some(path) => super::transport::unix_channel(std::path::Path::new(path)),
            None => Endpoint::from_shared(address.to_string())
                .map_err(|e| Status::invalid_argument(format!("agent address {address:?}: {e}")))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(CALL_TIMEOUT)
                .tcp_keepalive(Some(Duration::from_secs(30)))
                .connect_lazy(),
        };
        let client = NodeAgentClient::with_interceptor(channel, self.token.bearer());
        let known = nodes.contains_key(node);
        nodes.insert(
            node.to_string(),
            NodeEntry {
                address: address.to_string(),
                version: version.to_string(),
                last_seen: Instant::now(),
                client,
            },
        );
        tracing::info!(node, address, version, moved = known, "node registered");
        Ok(())
    }

    /// A client of `node`'s agent, or UNAVAILABLE when the node is unknown or silent.
    pub fn client(&self, node: &str) -> Result<AgentClient, Status> {
        let nodes = self.nodes.read();
        match nodes.get(node) {
            Some(e) if e.last_seen.elapsed() <= NODE_TIMEOUT => Ok(e.client.clone()),
            Some(e) => Err(Status::unavailable(format!(
                "node {node} has not been heard from for {}s (last at {}): is its snapblk node plugin running?",
                e.last_seen.elapsed().as_secs(),
                e.address
            ))),
            None => Err(Status::unavailable(format!(
                "node {node} is not registered with the controller: is its snapblk node plugin running (it registers within {}s of starting)?",
                HEARTBEAT_INTERVAL.as_secs()
            ))),
        }
    }

    /// The nodes heard from recently, in name order.
    pub fn live(&self) -> Vec<(String, AgentClient)> {
        self.nodes
            .read()
            .iter()
            .filter(|(_, e)| e.last_seen.elapsed() <= NODE_TIMEOUT)
            .map(|(n, e)| (n.clone(), e.client.clone()))
            .collect()
    }
}

/// The Registry service, for the nodes' heartbeats.
pub struct RegistryService(pub std::sync::Arc<Registry>);

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        self.0.heard(&r.node_id, &r.agent_address, &r.version)?;
        Ok(Response::new(pb::HeartbeatResponse {
            interval_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_and_silent_nodes_are_unavailable() {
        let r = Registry::new(Token::random());
        let e = r.client("node-a").expect_err("unknown");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("not registered"), "{}", e.message());
        r.heard("node-a", "http://127.0.0.1:1", "t").expect("heard");
        assert!(r.client("node-a").is_ok());
        assert_eq!(r.live().len(), 1);
        r.nodes.write().get_mut("node-a").expect("entry").last_seen -= NODE_TIMEOUT * 2;
        assert_eq!(
            r.client("node-a").expect_err("silent").code(),
            tonic::Code::Unavailable
        );
        assert!(r.live().is_empty());
        assert!(r.heard("bad/node", "http://127.0.0.1:1", "t").is_err());
        assert!(r.heard("node-b", "not a uri", "t").is_err());
    }
}
