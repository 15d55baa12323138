//! Helpers shared by the fuzz targets: checksum repair, so that mutated inputs get past
//! the checksums (which random bytes almost never match) and reach the decoding behind
//! them. Each target tries an input both as it is and repaired.

use snapblk::stream::format::{PREFIX_LEN, RECORD_HEADER_LEN, TRAILER_LEN};

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Rewrites every checksum and count of a backup stream so that only the fields' values,
/// not their checksums, decide whether it is accepted: record payload and header
/// checksums, the trailer's counts and stream checksum, the header's totals and checksum.
pub fn repair_stream(bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let Some(len) = u32_at(&b, 12) else { return b };
    let hlen = len as usize;
    if hlen < PREFIX_LEN + 4 || hlen > b.len() {
        return b;
    }
    // First pass: the records' counts, for the header's totals.
    let (mut records, mut data_bytes, mut zero_bytes) = (0u64, 0u64, 0u64);
    let mut pos = hlen;
    while pos + RECORD_HEADER_LEN <= b.len() {
        let kind = b[pos + 4];
        let length = u64_at(&b, pos + 16).unwrap_or(0);
        match kind {
            1 => {
                records += 1;
                data_bytes = data_bytes.wrapping_add(length);
                let Some(n) = usize::try_from(length).ok().filter(|n| *n <= b.len()) else {
                    break;
                };
                pos += RECORD_HEADER_LEN + n;
            }
            2 => {
                records += 1;
                zero_bytes = zero_bytes.wrapping_add(length);
                pos += RECORD_HEADER_LEN;
            }
            _ => break,
        }
    }
    // Totals at fixed offsets: after magic, version, length, kind, block size, volume
    // size, snapshot id and time, base id and time come records, data and zero bytes.
    if hlen >= 88 + 4 {
        put_u64(&mut b, 64, records);
        put_u64(&mut b, 72, data_bytes);
        put_u64(&mut b, 80, zero_bytes);
    }
    let crc = crc32c::crc32c(&b[..hlen - 4]);
    put_u32(&mut b, hlen - 4, crc);
    // Second pass: checksums and the trailer.
    let mut stream_crc = crc32c::crc32c(&b[..hlen]);
    let (mut dr, mut zr, mut db, mut zb) = (0u64, 0u64, 0u64, 0u64);
    let mut pos = hlen;
    while pos + RECORD_HEADER_LEN <= b.len() {
        let kind = b[pos + 4];
        let length = u64_at(&b, pos + 16).unwrap_or(0);
        let payload = match kind {
            1 => match usize::try_from(length)
                .ok()
                .filter(|n| *n <= b.len() - pos - RECORD_HEADER_LEN)
            {
                Some(n) => n,
                None => break,
            },
            2 => 0,
            3 => TRAILER_LEN.min(b.len() - pos - RECORD_HEADER_LEN),
            _ => break,
        };
        let at = pos + RECORD_HEADER_LEN;
        if kind == 3 && payload == TRAILER_LEN {
            put_u64(&mut b, at, dr);
            put_u64(&mut b, at + 8, zr);
            put_u64(&mut b, at + 16, db);
            put_u64(&mut b, at + 24, zb);
            put_u32(&mut b, at + 32, stream_crc);
        }
        let pcrc = if kind == 2 {
            0
        } else {
            crc32c::crc32c(&b[at..at + payload])
        };
        put_u32(&mut b, pos + 24, pcrc);
        let hcrc = crc32c::crc32c(&b[pos..pos + 28]);
        put_u32(&mut b, pos + 28, hcrc);
        stream_crc = crc32c::crc32c_append(stream_crc, &b[pos..at + payload]);
        match kind {
            1 => {
                dr += 1;
                db = db.wrapping_add(length);
            }
            2 => {
                zr += 1;
                zb = zb.wrapping_add(length);
            }
            _ => break,
        }
        pos = at + payload;
    }
    b
}

/// Rewrites the checksum line of a manifest to match its first line.
pub fn repair_manifest(bytes: &[u8]) -> Vec<u8> {
    let body_len = bytes
        .iter()
        .position(|&c| c == b'\n')
        .unwrap_or(bytes.len());
    let body = &bytes[..body_len];
    let mut out = body.to_vec();
    out.extend_from_slice(format!("\ncrc32c {:08x}\n", crc32c::crc32c(body)).as_bytes());
    out
}

/// Rewrites the header checksum and every record checksum of a map log.
pub fn repair_maplog(bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if b.len() < 32 {
        return b;
    }
    let crc = crc32c::crc32c(&b[..24]);
    put_u32(&mut b, 24, crc);
    let mut pos = 32;
    while pos + 16 <= b.len() {
        let Some(len) = u32_at(&b, pos + 8) else {
            break;
        };
        let end = pos + 16 + len as usize;
        if end > b.len() {
            break;
        }
        let mut head = [0u8; 5];
        head[0] = b[pos + 4];
        head[1..].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &b[pos + 16..end]);
        put_u32(&mut b, pos + 12, crc);
        pos = end;
    }
    b
}

/// A fresh folder, on tmpfs where there is one (volumes sync their files a lot).
pub fn scratch() -> tempfile::TempDir {
    match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm"),
        false => tempfile::tempdir(),
    }
    .expect("temporary folder")
}
