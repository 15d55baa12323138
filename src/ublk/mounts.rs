//! Where the served device is mounted, to warn (and sync) before stopping it.

use std::path::Path;

use crate::sys::mountinfo;

/// Where the block device node `path` is mounted, in this mount namespace or any other
/// this process can see (as paths that reach the mount from here: see
/// [`mountinfo::of_device_everywhere`]), so that a consumer in another namespace is synced
/// too before the device stops.
pub fn mount_points(path: &Path) -> Vec<String> {
    let Some((major, minor)) = mountinfo::device_number(path) else {
        return Vec::new();
    };
    mountinfo::of_device_everywhere(major, minor)
        .into_iter()
        .map(|m| m.access.display().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_block_device() {
        assert_eq!(
            mountinfo::device_number(Path::new("/proc/self/mountinfo")),
            None
        );
        assert!(mount_points(Path::new("/nonexistent/ublkb9")).is_empty());
    }
}
