//! The IDs the driver hands to Kubernetes, and the pagination tokens of its list calls.
//!
//! Every ID names the node that owns the object, so the controller needs no state of its
//! own to route a call: a volume is `<node>/<key>` and a snapshot `<node>/<key>/<n>`, where
//! `key` is the volume's folder on that node and `n` the engine's snapshot id (never
//! reused within a volume). Both stay well under the CSI limit of 128 bytes for any node
//! name up to 63 characters.

use std::fmt;

/// The CSI limit on the length of an ID.
pub const MAX_ID_LEN: usize = 128;

/// Longest node ID accepted: a DNS label, which every Kubernetes node name fits in practice.
pub const MAX_NODE_LEN: usize = 63;

/// Longest volume key (a folder name on the node).
pub const MAX_KEY_LEN: usize = 40;

/// Whether `s` is a safe path component made of `[A-Za-z0-9._-]`, not starting with `.`
/// or `-`, of 1 to `max` bytes: what node names and volume keys must be.
pub fn is_plain_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Why an ID was not understood. RPCs answer NotFound for it: an ID this driver did not
/// make names no volume of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an ID of this driver (expected {1})")]
pub struct BadId(pub String, pub &'static str);

/// A volume: the node that owns it and its key there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId {
    pub node: String,
    pub key: String,
}

impl VolumeId {
    /// Parses `<node>/<key>`.
    pub fn parse(s: &str) -> Result<VolumeId, BadId> {
        let bad = || BadId(s.to_string(), "<node>/<volume key>");
        let (node, key) = s.split_once('/').ok_or_else(bad)?;
        if !is_plain_name(node, MAX_NODE_LEN) || !is_plain_name(key, MAX_KEY_LEN) {
            return Err(bad());
        }
        Ok(VolumeId {
            node: node.to_string(),
            key: key.to_string(),
        })
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.key)
    }
}

/// A snapshot: its volume and the engine's snapshot id in that volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId {
    pub volume: VolumeId,
    pub id: u64,
}

impl SnapshotId {
    /// Parses `<node>/<key>/<n>`.
    pub fn parse(s: &str) -> Result<SnapshotId, BadId> {
        let bad = || BadId(s.to_string(), "<node>/<volume key>/<snapshot number>");
        let (vol, n) = s.rsplit_once('/').ok_or_else(bad)?;
        let volume = VolumeId::parse(vol).map_err(|_| bad())?;
        // Digits only: no sign, no leading zeros, so one snapshot has one ID.
        if n.is_empty()
            || !n.bytes().all(|b| b.is_ascii_digit())
            || (n.len() > 1 && n.starts_with('0'))
        {
            return Err(bad());
        }
        let id = n.parse().map_err(|_| bad())?;
        Ok(SnapshotId { volume, id })
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume, self.id)
    }
}

/// A group snapshot: `group:<key>`, where `key` (32 hex digits) is a digest of the
/// CreateVolumeGroupSnapshot name, so a retried call finds the same group with no state
/// kept anywhere. The group's membership lives with its member snapshots: each is named
/// `vgs-<key>-<volume key>` on its volume's node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupId {
    pub key: String,
}

const GROUP_PREFIX: &str = "group:";
const MEMBER_PREFIX: &str = "vgs-";
const GROUP_KEY_LEN: usize = 32;

impl GroupId {
    /// The group a CreateVolumeGroupSnapshot name makes.
    pub fn of_name(name: &str) -> GroupId {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(name.as_bytes());
        let key: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        GroupId {
            key: key[..GROUP_KEY_LEN].to_string(),
        }
    }

    /// Parses `group:<key>`.
    pub fn parse(s: &str) -> Result<GroupId, BadId> {
        let key = s
            .strip_prefix(GROUP_PREFIX)
            .filter(|k| is_group_key(k))
            .ok_or_else(|| BadId(s.to_string(), "group:<32 hex digits>"))?;
        Ok(GroupId {
            key: key.to_string(),
        })
    }

    /// The snapshot name of this group's member of volume `volume_key`.
    pub fn member_name(&self, volume_key: &str) -> String {
        format!("{MEMBER_PREFIX}{}-{volume_key}", self.key)
    }

    /// The group a snapshot belongs to, from its (engine) name.
    pub fn of_member(snapshot_name: &str) -> Option<GroupId> {
        let rest = snapshot_name.strip_prefix(MEMBER_PREFIX)?;
        let (key, volume) = rest.split_once('-')?;
        (is_group_key(key) && is_plain_name(volume, MAX_KEY_LEN)).then(|| GroupId {
            key: key.to_string(),
        })
    }
}

fn is_group_key(k: &str) -> bool {
    k.len() == GROUP_KEY_LEN
        && k.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{GROUP_PREFIX}{}", self.key)
    }
}

/// A list call's position: entries are listed in ID order and a token names the last ID of
/// the previous page, so pages stay correct while entries come and go, and the controller
/// keeps no cursor.
pub mod token {
    const PREFIX: &str = "after:";

    /// The token that resumes after `last_id`.
    pub fn after(last_id: &str) -> String {
        let hex: String = last_id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{PREFIX}{hex}")
    }

    /// The ID a token resumes after; `None` for a token this driver did not make.
    pub fn parse(token: &str) -> Option<String> {
        let hex = token.strip_prefix(PREFIX)?;
        if hex.is_empty() || hex.len() % 2 != 0 {
            return None;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        String::from_utf8(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_round_trip_and_refuse_garbage() {
        let v = VolumeId::parse("node-a/0123abcd").expect("valid");
        assert_eq!(v.node, "node-a");
        assert_eq!(v.key, "0123abcd");
        assert_eq!(v.to_string(), "node-a/0123abcd");
        for bad in [
            "",
            "node-a",
            "/k",
            "n/",
            "n/k/x",
            "n/../x",
            "n/.hidden",
            "n/-opt",
            "n a/k",
            "some-vol-id",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long_node = "n".repeat(MAX_NODE_LEN + 1);
        assert!(VolumeId::parse(&format!("{long_node}/k")).is_err());
    }

    #[test]
    fn snapshot_ids_round_trip_and_refuse_garbage() {
        let s = SnapshotId::parse("node-b/0123abcd/17").expect("valid");
        assert_eq!(s.volume.node, "node-b");
        assert_eq!(s.id, 17);
        assert_eq!(s.to_string(), "node-b/0123abcd/17");
        for bad in [
            "node-b/k",
            "node-b/k/",
            "node-b/k/x",
            "node-b/k/-1",
            "node-b/k/01",
            "k/1",
        ] {
            assert!(SnapshotId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn longest_ids_fit_the_csi_limit() {
        let s = SnapshotId {
            volume: VolumeId {
                node: "n".repeat(MAX_NODE_LEN),
                key: "k".repeat(MAX_KEY_LEN),
            },
            id: u64::MAX,
        };
        assert!(s.to_string().len() <= MAX_ID_LEN, "{}", s.to_string().len());
    }

    #[test]
    fn group_ids_round_trip_and_name_their_members() {
        let g = GroupId::of_name("groupsnapshot-0b8d3f6e-8a6e-4d55-9d7e-1f0c2b3a4d5e");
        assert_eq!(
            g,
            GroupId::of_name("groupsnapshot-0b8d3f6e-8a6e-4d55-9d7e-1f0c2b3a4d5e")
        );
        assert_ne!(g, GroupId::of_name("groupsnapshot-other"));
        let id = g.to_string();
        assert!(id.len() <= MAX_ID_LEN);
        assert_eq!(GroupId::parse(&id).expect("parse"), g);
        // Not a volume ID either, so one cannot be mistaken for the other.
        assert!(VolumeId::parse(&id).is_err());
        let m = g.member_name("0123abcd0123abcd");
        assert!(crate::engine::validate_snapshot_name(&m).is_ok(), "{m}");
        assert_eq!(GroupId::of_member(&m), Some(g.clone()));
        for bad in [
            "",
            "group:",
            "group:xyz",
            "node-a/k",
            &format!("group:{}0", g.key),
        ] {
            assert!(GroupId::parse(bad).is_err(), "{bad:?} accepted");
        }
        for not_member in ["snapshot-1", "vgs-", "vgs-abc-k", &format!("vgs-{}", g.key)] {
            assert_eq!(GroupId::of_member(not_member), None, "{not_member:?}");
        }
    }

    #[test]
    fn tokens_round_trip_and_refuse_foreign_ones() {
        let t = token::after("node-a/k/3");
        assert_eq!(token::parse(&t).as_deref(), Some("node-a/k/3"));
        for bad in ["", "invalid-token", "after:", "after:zz", "after:123"] {
            assert_eq!(token::parse(bad), None, "{bad:?}");
        }
    }
}
