//! The ublk block device layer (lands in the next commit).
