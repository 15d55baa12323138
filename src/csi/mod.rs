//! The CSI driver: how Kubernetes creates, stages, snapshots, restores and grows snapblk
//! volumes (CSI specification v1.12; see docs/csi.md).
//!
//! One controller for the cluster decides and forwards; a node plugin on every node owns
//! the volumes that live there and does the work, through the layers below (`ctl` to reach
//! a served volume's daemon, the engine for a volume nobody serves). The controller keeps
//! no state: IDs name their node, and the nodes announce themselves by heartbeat.
//!
//! One file per gRPC service (`identity`, `controller`, `group_controller`, `node`,
//! `snapshot_metadata`, and
//! `agent`: the node's side of the controller-to-node contract in
//! `proto/snapblk_node.proto`).

pub mod agent;
pub mod auth;
pub mod controller;
pub mod daemon;
pub mod group_controller;
pub mod identity;
pub mod ids;
pub mod metrics;
pub mod mounts;
pub mod node;
pub mod oplock;
pub mod params;
pub mod proto;
pub mod registry;
pub mod server;
pub mod snapshot_metadata;
pub mod status;
pub mod store;
pub mod transport;
