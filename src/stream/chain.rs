//! The chain rules: which streams may follow which. Checked on the headers alone, before
//! an import writes anything, so a wrong order costs nothing.

use std::collections::HashSet;

use super::error::{Result, StreamError};
use super::format::{SnapshotRef, StreamHeader};

/// Checks that `streams` (name, header), in order, form one chain: a full stream, then
/// incrementals each based on the snapshot of the stream before it, all of one volume.
pub fn check_chain(streams: &[(&str, &StreamHeader)]) -> Result<()> {
    let Some((first_name, first)) = streams.first() else {
        return Err(StreamError::Invalid("no stream to import".into()));
    };
    let fail = |name: &str, reason: String| StreamError::Chain {
        stream: name.to_string(),
        offset: 0,
        reason,
    };
    if let Some(base) = &first.source.base {
        return Err(fail(
            first_name,
            format!(
                "incremental stream (snapshot {} on top of {}) where a full stream must come first",
                show(&first.source.snapshot),
                show(base)
            ),
        ));
    }
    let mut names = HashSet::new();
    names.insert(first.source.snapshot.name.as_str());
    for pair in streams.windows(2) {
        let (_, prev) = pair[0];
        let (name, h) = pair[1];
        let (p, s) = (&prev.source, &h.source);
        let Some(base) = &s.base else {
            return Err(fail(
                name,
                format!(
                    "full stream (snapshot {}) after the stream of snapshot {}: only incremental streams may follow the first",
                    show(&s.snapshot),
                    show(&p.snapshot)
                ),
            ));
        };
        if s.volume_id != p.volume_id {
            return Err(fail(
                name,
                format!(
                    "stream of volume {} where the chain is of volume {}",
                    s.volume_id, p.volume_id
                ),
            ));
        }
        if s.block_size != p.block_size || s.volume_size < p.volume_size {
            return Err(fail(
                name,
                format!(
                    "volume of {} bytes with {}-byte blocks where the chain has {} bytes with {}-byte blocks (a volume may only grow along a chain)",
                    s.volume_size, s.block_size, p.volume_size, p.block_size
                ),
            ));
        }
        if base != &p.snapshot {
            return Err(fail(
                name,
                format!(
                    "incremental based on snapshot {} but the previous stream holds snapshot {}",
                    show(base),
                    show(&p.snapshot)
                ),
            ));
        }
        if !names.insert(s.snapshot.name.as_str()) {
            return Err(fail(
                name,
                format!(
                    "snapshot name {:?} appears twice in the chain",
                    s.snapshot.name
                ),
            ));
        }
    }
    Ok(())
}

/// `"name" (id N)` for messages.
fn show(s: &SnapshotRef) -> String {
    format!("{:?} (id {})", s.name, s.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::format::{StreamSource, Totals};

    fn snap(name: &str, id: u64) -> SnapshotRef {
        SnapshotRef {
            name: name.into(),
            id,
            created_unix_ms: id * 1000,
        }
    }

    fn h(vol: &str, s: SnapshotRef, base: Option<SnapshotRef>) -> StreamHeader {
        StreamHeader {
            source: StreamSource {
                volume_id: vol.into(),
                volume_size: 1 << 20,
                block_size: 4096,
                snapshot: s,
                base,
            },
            totals: Totals::default(),
        }
    }

    fn check(list: &[StreamHeader]) -> std::result::Result<(), String> {
        let named: Vec<(&str, &StreamHeader)> = list.iter().map(|h| ("s", h)).collect();
        check_chain(&named).map_err(|e| e.to_string())
    }

    #[test]
    fn chain_rules() {
        let full = h("v", snap("a", 1), None);
        let inc_b = h("v", snap("b", 2), Some(snap("a", 1)));
        let inc_c = h("v", snap("c", 3), Some(snap("b", 2)));
        check(&[full.clone(), inc_b.clone(), inc_c.clone()]).expect("good chain");
        check(std::slice::from_ref(&full)).expect("a full stream alone");

        let e = check(&[]).expect_err("empty");
        assert!(e.contains("no stream"), "{e}");
        let e = check(std::slice::from_ref(&inc_b)).expect_err("incremental first");
        assert!(e.contains("full stream must come first"), "{e}");
        let e = check(&[full.clone(), full.clone()]).expect_err("two fulls");
        assert!(e.contains("only incremental"), "{e}");
        let e = check(&[full.clone(), inc_c.clone()]).expect_err("skipped one");
        assert!(e.contains("based on snapshot \"b\""), "{e}");
        let e = check(&[full.clone(), inc_c.clone(), inc_b.clone()]).expect_err("swapped");
        assert!(e.contains("previous stream holds"), "{e}");
        let other = h("w", snap("b", 2), Some(snap("a", 1)));
        let e = check(&[full.clone(), other]).expect_err("other volume");
        assert!(e.contains("volume w"), "{e}");
        let same_name_new_id = h("v", snap("b", 2), Some(snap("a", 9)));
        let e = check(&[full.clone(), same_name_new_id]).expect_err("recreated base");
        assert!(e.contains("(id 9)"), "{e}");
        // The volume grew between b and c: fine; shrinking along a chain is not.
        let mut grown_c = inc_c.clone();
        grown_c.source.volume_size = 2 << 20;
        check(&[full.clone(), inc_b.clone(), grown_c.clone()]).expect("grown");
        let mut shrunk = inc_c.clone();
        shrunk.source.volume_size = 1 << 19;
        let e = check(&[full.clone(), inc_b.clone(), shrunk]).expect_err("shrunk");
        assert!(e.contains("only grow"), "{e}");
        let mut other_bs = inc_b.clone();
        other_bs.source.block_size = 512;
        let e = check(&[full.clone(), other_bs]).expect_err("block size");
        assert!(e.contains("512-byte blocks"), "{e}");
        let again = h("v", snap("a", 4), Some(snap("c", 3)));
        let e = check(&[full, inc_b, inc_c, again]).expect_err("name reused");
        assert!(e.contains("twice"), "{e}");
    }
}
