//! The block-device parameters sent to the driver: sizes from the volume, a volatile
//! write cache with FUA (so the kernel sends FLUSH), discard and write-zeroes support.

use libublk::sys;

use super::error::{Result, UblkLayerError};

/// Largest request the device accepts, and the size of each per-tag copy buffer.
pub const MAX_IO_BYTES: u32 = 512 * 1024;

/// Largest DISCARD / WRITE_ZEROES request, in 512-byte sectors (1 GiB): big enough for
/// mkfs and fstrim, small enough that one request does not hold a worker for long.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// log2 of a power of two (None otherwise).
fn shift_of(v: u64) -> Option<u8> {
    if v.is_power_of_two() {
        u8::try_from(v.trailing_zeros()).ok()
    } else {
        None
    }
}

/// Builds the device parameters for a volume of `size` bytes and `block_size` logical
/// blocks, with requests of at most `max_io_bytes`. A `read_only` device (a snapshot)
/// is marked so in the kernel, which then refuses writes before they reach us, and
/// offers neither a write cache nor discard.
pub fn device_params(
    size: u64,
    block_size: u32,
    max_io_bytes: u32,
    read_only: bool,
) -> Result<sys::ublk_params> {
    let lbs_shift = shift_of(u64::from(block_size))
        .filter(|s| (9..=12).contains(s))
        .ok_or_else(|| {
            UblkLayerError::InvalidOption(format!(
                "the volume's block size {block_size} is not supported (512 to 4096, a power of two)"
            ))
        })?;
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return Err(UblkLayerError::InvalidOption(format!(
            "the volume's size {size} is not a positive multiple of its block size {block_size}"
        )));
    }
    if max_io_bytes < block_size || !max_io_bytes.is_multiple_of(block_size) {
        return Err(UblkLayerError::InvalidOption(format!(
            "maximum request size {max_io_bytes} is not a multiple of the block size {block_size}"
        )));
    }
    // Physical blocks: at least a page, so file systems align their I/O to 4 KiB.
    let pbs_shift = lbs_shift.max(12);
    let mut params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            // Volatile cache + FUA: the kernel sends FLUSH and FUA writes, which are our
            // durability points. Not rotational (attribute left clear).
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: lbs_shift,
            physical_bs_shift: pbs_shift,
            io_opt_shift: pbs_shift,
            io_min_shift: lbs_shift,
            max_sectors: max_io_bytes >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: block_size,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            // The driver supports one range per discard request.
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    if read_only {
        params.types = sys::UBLK_PARAM_TYPE_BASIC;
        params.basic.attrs = sys::UBLK_ATTR_READ_ONLY;
        params.discard = Default::default();
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_for_4k_volume() {
        let p = device_params(256 << 20, 4096, MAX_IO_BYTES, false).expect("valid");
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (256 << 20) >> 9);
        assert_eq!(p.basic.max_sectors, MAX_IO_BYTES >> 9);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_FUA, 0);
        assert_eq!(p.basic.attrs & sys::UBLK_ATTR_ROTATIONAL, 0);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
    }

    #[test]
    fn params_for_512_volume() {
        let p = device_params(64 << 20, 512, MAX_IO_BYTES, false).expect("valid");
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.discard.discard_granularity, 512);
    }

    #[test]
    fn params_for_read_only_snapshot() {
        let p = device_params(64 << 20, 4096, MAX_IO_BYTES, true).expect("valid");
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_READ_ONLY);
        assert_eq!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.basic.dev_sectors, (64 << 20) >> 9);
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(device_params(64 << 20, 1000, MAX_IO_BYTES, false).is_err());
        assert!(device_params(64 << 20, 8192, MAX_IO_BYTES, false).is_err());
        assert!(device_params(4096 + 512, 4096, MAX_IO_BYTES, false).is_err());
        assert!(device_params(0, 4096, MAX_IO_BYTES, false).is_err());
        assert!(device_params(1 << 20, 4096, 1000, false).is_err());
    }
}
