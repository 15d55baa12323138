//! snapblk: serves volumes as Linux ublk block devices with instant, consistent snapshots.
//!
//! Layers, data flowing down: `cli` (argument parsing) -> `ublk` (the block device) ->
//! `engine` (the volume: layers, roaring maps, snapshots; plain files, no kernel driver).

pub mod cli;
pub mod engine;
pub mod ublk;
