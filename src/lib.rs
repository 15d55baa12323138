//! snapblk: serves volumes as Linux ublk block devices with instant, consistent snapshots.
//!
//! Layers, data flowing down: `cli` (argument parsing) -> `ctl` (control socket, freeze
//! coordination) -> `ublk` (the block device) -> `engine` (the volume: layers, roaring
//! maps, snapshots; plain files, no kernel driver). `sys` holds small OS helpers, `stats`
//! the request and duration counters the layers share for metrics.

pub mod cli;
pub mod csi;
pub mod ctl;
pub mod engine;
pub mod stats;
pub mod stream;
pub mod sys;
pub mod ublk;
