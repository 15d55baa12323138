//! Volumes whose stacks mix both layer layouts: identity layers (blocks at their own
//! offsets, what older builds wrote and what merges into a shared layer build) and
//! slotted ones (blocks in slots, every head this build makes). Snapshots, discards,
//! grows, clones and every kind of merge must keep each view's content, across reopens.
//!
//! One test in its own binary: it switches the layout of new heads with the
//! `SNAPBLK_HEAD_LAYOUT` setting, which is process-wide.

mod common;

use std::path::Path;

use snapblk::engine::{CreateOptions, Volume, LAYOUT_ENV};

use common::{block_data, scratch};

const BS: usize = 4096;
const BLOCKS: usize = 96;

/// The expected content of a view, one version per block (0: zeros).
type Image = Vec<u64>;

fn write(v: &Volume, img: &mut Image, first: usize, versions: &[u64]) {
    let mut buf = Vec::with_capacity(versions.len() * BS);
    for (i, &ver) in versions.iter().enumerate() {
        buf.extend_from_slice(&block_data(ver, BS));
        img[first + i] = ver;
    }
    v.write((first * BS) as u64, &buf, false).expect("write");
}

fn expect(img: &Image, got: &[u8], what: &str) {
    for (b, &ver) in img.iter().enumerate() {
        let block = &got[b * BS..(b + 1) * BS];
        if ver == 0 {
            assert!(
                block.iter().all(|&x| x == 0),
                "{what}: block {b} is not zeros"
            );
        } else {
            assert!(
                block == block_data(ver, BS),
                "{what}: block {b} is not version {ver}"
            );
        }
    }
}

fn check(v: &Volume, live: &Image, snaps: &[(String, Image)], what: &str) {
    let mut buf = vec![0u8; live.len() * BS];
    v.read(0, &mut buf).expect("read");
    expect(live, &buf, &format!("{what}: live"));
    for (name, img) in snaps {
        let mut buf = vec![0u8; img.len() * BS];
        v.read_snapshot(name, 0, &mut buf).expect("read snapshot");
        expect(img, &buf, &format!("{what}: snapshot {name}"));
    }
}

fn layout(slotted: bool) {
    if slotted {
        std::env::remove_var(LAYOUT_ENV);
    } else {
        std::env::set_var(LAYOUT_ENV, "identity");
    }
}

fn head_file_len(dir: &Path, v: &Volume) -> (bool, u64) {
    let st = v.status();
    let head = std::fs::read_dir(dir.join("layers"))
        .expect("layers")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".data"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id: u64 = name.trim_end_matches(".data").parse().expect("id");
            (id, e.metadata().expect("stat").len())
        })
        .max()
        .expect("a head file");
    (st.slotted_head, head.1)
}

#[test]
fn mixed_layouts_keep_every_view_through_merges_clones_and_reopens() {
    let root = scratch();
    let dir = root.path().join("v");
    let mut vers = 1u64..;
    let mut next =
        |n: usize| -> Vec<u64> { (0..n).map(|_| vers.next().expect("version")).collect() };

    // An identity head, as an older build made it.
    layout(false);
    let v = Volume::create(
        &dir,
        &CreateOptions {
            size: (BLOCKS / 2 * BS) as u64,
            block_size: BS as u32,
        },
    )
    .expect("create");
    let mut live: Image = vec![0; BLOCKS / 2];
    let mut snaps: Vec<(String, Image)> = Vec::new();
    write(&v, &mut live, 0, &next(20));
    assert!(!v.status().slotted_head);
    // An identity head's file follows the volume's size, also when it grows.
    v.resize((BLOCKS * BS) as u64).expect("grow");
    live.resize(BLOCKS, 0);
    assert_eq!(head_file_len(&dir, &v), (false, (BLOCKS * BS) as u64));
    v.create_snapshot("s1").expect("s1");
    snaps.push(("s1".into(), live.clone()));
    write(&v, &mut live, 10, &next(30));

    // From here on, every new head is slotted.
    layout(true);
    v.create_snapshot("s2").expect("s2");
    snaps.push(("s2".into(), live.clone()));
    assert!(v.status().slotted_head);
    // First writes in a slotted head land in slots in arrival order: scattered and
    // backwards, so that slots and blocks disagree.
    for b in (0..BLOCKS).rev().step_by(3) {
        write(&v, &mut live, b, &next(1));
    }
    write(&v, &mut live, 40, &next(16));
    // A discard keeps the blocks' slots; writing them again reuses them.
    v.discard((44 * BS) as u64, (8 * BS) as u64)
        .expect("discard");
    live[44..52].iter_mut().for_each(|x| *x = 0);
    write(&v, &mut live, 46, &next(3));
    check(&v, &live, &snaps, "slotted head over identity layers");
    v.create_snapshot("s3").expect("s3");
    snaps.push(("s3".into(), live.clone()));
    write(&v, &mut live, 5, &next(50));
    v.create_snapshot("s4").expect("s4");
    snaps.push(("s4".into(), live.clone()));
    write(&v, &mut live, 60, &next(7));
    check(&v, &live, &snaps, "four snapshots");

    // A clone shares s3's slotted layer: deleting s2 merges its identity layer into
    // that shared slotted layer, which builds a new identity file.
    let cdir = root.path().join("clone");
    let c = v.clone_snapshot("s3", &cdir).expect("clone");
    let s3 = snaps[2].1.clone();
    check(&c, &s3, &[], "clone of s3");
    v.delete_snapshot("s2").expect("delete s2");
    snaps.retain(|s| s.0 != "s2");
    check(&v, &live, &snaps, "after merging s2 into a shared layer");
    // Deleting s1 merges an identity layer into the merged identity layer, in place.
    v.delete_snapshot("s1").expect("delete s1");
    snaps.retain(|s| s.0 != "s1");
    check(&v, &live, &snaps, "after merging s1");
    // Deleting s3 merges into s4's slotted layer, which nothing shares: the blocks it
    // lacks go to new slots at the end of its file.
    v.delete_snapshot("s3").expect("delete s3");
    snaps.retain(|s| s.0 != "s3");
    check(
        &v,
        &live,
        &snaps,
        "after merging into a slotted layer in place",
    );
    v.create_snapshot("s5").expect("s5");
    snaps.push(("s5".into(), live.clone()));
    write(&v, &mut live, 0, &next(BLOCKS));
    // s4's layer now lies right under the head's: a delete merges it once s6 seals it.
    v.delete_snapshot("s4").expect("delete s4");
    snaps.retain(|s| s.0 != "s4");
    v.create_snapshot("s6").expect("s6");
    snaps.push(("s6".into(), live.clone()));
    check(&v, &live, &snaps, "after merges under the head");
    v.flush().expect("flush");
    v.close().expect("close");
    c.close().expect("close clone");

    let v = Volume::open(&dir).expect("reopen");
    check(&v, &live, &snaps, "reopened");
    // Writes after a reopen take slots the open found free, never used ones.
    write(&v, &mut live, 20, &next(30));
    check(&v, &live, &snaps, "written after the reopen");
    v.close().expect("close");
    let v = Volume::open(&dir).expect("reopen");
    check(&v, &live, &snaps, "reopened again");
    let c = Volume::open(&cdir).expect("reopen clone");
    check(&c, &s3, &[], "clone of s3, reopened");
}
