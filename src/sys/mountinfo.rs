//! Finding where a block device is mounted, from `/proc/self/mountinfo`.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The `major:minor` of block device node `path`, if it is one.
pub fn device_number(path: &Path) -> Option<(u32, u32)> {
    let md = std::fs::metadata(path).ok()?;
    if !md.file_type().is_block_device() {
        return None;
    }
    let rdev = md.rdev();
    Some((libc::major(rdev), libc::minor(rdev)))
}

/// One line of mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    /// Root of the mount within its file system (`/` unless a bind mount of a subfolder).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(oct[0] - b'0') * 64
                    + u32::from(oct[1] - b'0') * 8
                    + u32::from(oct[2] - b'0');
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    // id parent major:minor root mount-point options [optional fields...] - fstype source super-options
    let (left, right) = line.split_once(" - ")?;
    let f: Vec<&str> = left.split(' ').collect();
    if f.len() < 6 {
        return None;
    }
    let (major, minor) = f[2].split_once(':')?;
    let r: Vec<&str> = right.split(' ').collect();
    Some(Mount {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: PathBuf::from(unescape(f[3])),
        mount_point: PathBuf::from(unescape(f[4])),
        fstype: r.first()?.to_string(),
        source: r.get(1).map(|s| unescape(s)).unwrap_or_default(),
    })
}

/// Mounts of device `major:minor` in this process's mount namespace.
pub fn of_device(major: u32, minor: u32) -> std::io::Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse(&text)
        .into_iter()
        .filter(|m| m.major == major && m.minor == minor)
        .collect())
}

/// The mount whose mount point is `path` exactly, if any.
pub fn at(path: &Path) -> std::io::Result<Option<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path))
}

/// A mount of a device in some mount namespace, with a path this process can open to
/// reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenMount {
    /// The mount as its namespace's mountinfo shows it.
    pub mount: Mount,
    /// Its mount point as seen from here: the mount point itself in this process's
    /// namespace, `/proc/PID/root/<mount point>` in another.
    pub access: PathBuf,
    /// The process whose mount namespace holds it; None for this process's own.
    pub pid: Option<u32>,
}

/// The mount namespace of process `pid` ("self" for this one), as `mnt:[inode]`.
fn mount_namespace(pid: &str) -> Option<std::ffi::OsString> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(PathBuf::into_os_string)
}

/// Mounts of device `major:minor` in every mount namespace this process can see: its own
/// first, then PID 1's (the host's, where the kubelet and most consumers mount), then
/// those of every other process, one process per namespace. A daemon in a container or a
/// CSI node plugin does not share its consumer's mount namespace; FIFREEZE through
/// `/proc/PID/root/<mount point>` reaches the file system all the same.
pub fn of_device_everywhere(major: u32, minor: u32) -> Vec<SeenMount> {
    let own = mount_namespace("self");
    let mut seen: Vec<std::ffi::OsString> = own.clone().into_iter().collect();
    let mut out: Vec<SeenMount> = of_device(major, minor)
        .unwrap_or_default()
        .into_iter()
        .map(|m| SeenMount {
            access: m.mount_point.clone(),
            mount: m,
            pid: None,
        })
        .collect();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    // PID 1 first: its root never goes away while the system runs.
    pids.retain(|&p| p != 1);
    pids.insert(0, 1);
    for pid in pids {
        let Some(ns) = mount_namespace(&pid.to_string()) else {
            continue;
        };
        if seen.contains(&ns) {
            continue;
        }
        seen.push(ns);
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        out.extend(
            parse(&text)
                .into_iter()
                .filter(|m| m.major == major && m.minor == minor)
                .map(|m| SeenMount {
                    access: root.join(m.mount_point.strip_prefix("/").unwrap_or(&m.mount_point)),
                    mount: m,
                    pid: Some(pid),
                }),
        );
    }
    out
}

/// Whether block device node `path` is open exclusively (a mounted file system holds it
/// so, as do device-mapper, md and mkfs): opening it with O_EXCL fails with EBUSY.
pub fn held_exclusively(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// The devices stacked on block device `name` (`ublkb0`): device-mapper, md...
pub fn holders(name: &str) -> Vec<String> {
    std::fs::read_dir(format!("/sys/class/block/{name}/holders"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// True for NFS client mounts, which no local freeze can make consistent.
pub fn is_nfs(m: &Mount) -> bool {
    m.fstype == "nfs" || m.fstype == "nfs4"
}

/// Paths exported by the kernel NFS server (from /proc/fs/nfs/exports), empty if none.
pub fn nfs_exports() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/fs/nfs/exports")
        .map(|t| {
            t.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter_map(|l| {
                    l.split_whitespace()
                        .next()
                        .map(|p| PathBuf::from(unescape(p)))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/vda2 rw
95 22 259:7 / /mnt/data rw,relatime shared:40 - xfs /dev/ublkb0 rw,attr2
96 22 259:7 /sub /var/lib/kubelet/pods/x/volumes/my\\040vol rw - xfs /dev/ublkb0 rw
97 22 0:55 / /mnt/nfs rw,relatime shared:41 master:2 - nfs4 server:/export rw,vers=4.2
garbage line
";

    #[test]
    fn parses_mounts_with_escapes_and_optional_fields() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 4);
        let ours: Vec<_> = m
            .iter()
            .filter(|x| (x.major, x.minor) == (259, 7))
            .collect();
        assert_eq!(ours.len(), 2);
        assert_eq!(ours[0].mount_point, PathBuf::from("/mnt/data"));
        assert_eq!(
            ours[1].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/x/volumes/my vol")
        );
        assert_eq!(ours[1].root, PathBuf::from("/sub"));
        assert_eq!(ours[0].fstype, "xfs");
        assert!(is_nfs(&m[3]));
        assert!(!is_nfs(&m[1]));
        assert_eq!(m[3].source, "server:/export");
    }

    #[test]
    fn unescape_leaves_other_backslashes() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\9zz"), "a\\9zz");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
