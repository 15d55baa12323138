//! A backup stream of arbitrary bytes: reading it must give records or an error, and an
//! import of it must build the volume inside its folder or nothing, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapblk::stream::{import_streams, NoProgress, StreamInput, StreamReader};

fn read_all(bytes: &[u8]) -> bool {
    let Ok(mut r) = StreamReader::open(bytes, "fuzz") else {
        return false;
    };
    loop {
        match r.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        snapblk_fuzz::repair_stream(rest)
    } else {
        rest.to_vec()
    };
    if !read_all(&bytes) || mode & 2 == 0 {
        return;
    }
    // A whole, valid stream: import it into a fresh folder.
    let dir = snapblk_fuzz::scratch();
    let target = dir.path().join("volume");
    let res = import_streams(
        &target,
        vec![StreamInput::new("fuzz", &bytes[..])],
        &NoProgress,
    );
    // Nothing but the target may be left in the folder, and only when the import worked.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    match res {
        Ok(_) => assert_eq!(names, vec![std::ffi::OsString::from("volume")]),
        Err(_) => assert!(names.is_empty(), "a failed import left {names:?}"),
    }
});
