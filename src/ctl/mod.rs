//! The control layer: the per-volume control socket (JSON lines over a Unix socket), its
//! client, and freeze coordination for application-consistent snapshots. It drives the
//! engine and knows the device only by its path and number; it knows nothing of ublk.

pub mod client;
pub mod freeze;
pub mod protocol;
pub mod server;
pub mod service;
