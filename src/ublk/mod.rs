//! The ublk layer: serves a volume as a Linux ublk block device (/dev/ublkbN) through
//! libublk, turning each request into engine calls and io_uring operations on the
//! queue's own ring. It knows nothing of the snapshot format.
//!
//! - [`device`]: add or recover the device, serve until SIGTERM/SIGINT, stop and delete.
//! - [`queue`] / [`tags`] / [`io`]: one thread per queue; each tag a state machine
//!   driven by the queue's ring completions, one request at a time.
//! - [`worker`]: blocking engine calls (flush, discard, write zeroes) off the queues.
//! - [`expose`]: a snapshot as a read-only device beside the volume's.
//! - [`affinity`]: which CPUs the queue threads may run on.
//! - [`features`]: zero copy (`UBLK_F_AUTO_BUF_REG`, 6.16+) or copy mode.

pub mod affinity;
pub mod device;
pub mod error;
pub mod expose;
pub mod features;
pub mod io;
pub mod mounts;
pub mod params;
pub mod queue;
pub mod recover;
pub mod signals;
pub mod tags;
pub mod worker;

pub use device::{default_queues, resize_device, serve, ServeOptions, ServingDevice, CONTROL_PATH};
pub use error::{Result, UblkLayerError};
pub use expose::{expose, ExposeOptions, ExposedDevice};
pub use features::DataMode;
