//! The CSI driver: Kubernetes' interface to snapblk volumes and snapshots.
pub mod ids;
pub mod proto;
