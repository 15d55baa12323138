//! Generated gRPC code: the CSI specification (package `csi.v1`) and the controller-to-node
//! contract (package `snapblk.node.v1`), both compiled from `proto/` by the build script.

/// The CSI specification, v1.12.
#[allow(clippy::all, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The contract between the controller and the node plugins (proto/snapblk_node.proto).
#[allow(clippy::all, missing_docs)]
pub mod node {
    tonic::include_proto!("snapblk.node.v1");
}
