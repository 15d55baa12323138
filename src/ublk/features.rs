//! What the loaded ublk driver offers (GET_FEATURES) and the device flags and data mode
//! chosen from it, so that one binary runs on 6.12 (copy) and 6.16+ (zero copy).

use libublk::sys;

/// How request data moves between the kernel and the layer files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMode {
    /// `UBLK_F_AUTO_BUF_REG`: the request's pages are registered in the queue's ring and
    /// read/written by fixed-buffer ops; the data never enters the daemon's memory.
    ZeroCopy,
    /// The driver copies request data to and from a per-tag buffer of the daemon.
    Copy,
}

impl DataMode {
    /// The mode a device created with `dev_flags` runs in.
    pub fn of_device_flags(dev_flags: u64) -> DataMode {
        if dev_flags & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0 {
            DataMode::ZeroCopy
        } else {
            DataMode::Copy
        }
    }

    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            DataMode::ZeroCopy => "zero-copy",
            DataMode::Copy => "copy",
        }
    }
}

/// The flags to create a device with, the data mode they select and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFlags {
    /// `UBLK_F_*` flags for ADD_DEV.
    pub ctrl_flags: u64,
    /// The data mode these flags select.
    pub mode: DataMode,
    /// Why this mode was chosen (for the info log).
    pub reason: &'static str,
    /// Requested flags the driver does not offer, by name (warned about).
    pub missing: Vec<&'static str>,
}

/// Asks the driver for its feature bits; None if it predates GET_FEATURES (< 6.5).
pub fn query_driver_features() -> Option<u64> {
    libublk::ctrl::UblkCtrl::get_features()
}

/// Whether a driver with `features` can change a live device's size
/// (`UBLK_U_CMD_UPDATE_SIZE`, Linux 6.16+). The flag is only advisory for the driver,
/// but it is how a driver says it knows the command; older ones refuse it.
pub fn can_update_size(features: Option<u64>) -> bool {
    features.is_some_and(|f| f & u64::from(sys::UBLK_F_UPDATE_SIZE) != 0)
}

/// Chooses the ADD_DEV flags from the driver's features (None: unknown, older than 6.5).
///
/// Always asks for user recovery with reissue, so a killed daemon can be replaced and
/// the requests it held are sent again. Zero copy is used when the driver offers
/// `UBLK_F_AUTO_BUF_REG` unless `force_copy` is set.
pub fn choose_device_flags(features: Option<u64>, force_copy: bool) -> DeviceFlags {
    let has = |flag: u32| features.is_some_and(|f| f & u64::from(flag) != 0);
    let mut ctrl_flags = 0u64;
    let mut missing = Vec::new();
    for (flag, name) in [
        (sys::UBLK_F_USER_RECOVERY, "UBLK_F_USER_RECOVERY"),
        (
            sys::UBLK_F_USER_RECOVERY_REISSUE,
            "UBLK_F_USER_RECOVERY_REISSUE",
        ),
    ] {
        if features.is_none() || has(flag) {
            ctrl_flags |= u64::from(flag);
        } else {
            missing.push(name);
        }
    }
    if has(sys::UBLK_F_CMD_IOCTL_ENCODE) {
        ctrl_flags |= u64::from(sys::UBLK_F_CMD_IOCTL_ENCODE);
    }
    let (mode, reason) = if force_copy {
        (DataMode::Copy, "forced by --copy")
    } else if has(sys::UBLK_F_AUTO_BUF_REG) {
        ctrl_flags |= u64::from(sys::UBLK_F_AUTO_BUF_REG);
        (DataMode::ZeroCopy, "driver offers UBLK_F_AUTO_BUF_REG")
    } else if features.is_none() {
        (DataMode::Copy, "driver does not answer GET_FEATURES")
    } else {
        (
            DataMode::Copy,
            "driver lacks UBLK_F_AUTO_BUF_REG (needs Linux 6.16+)",
        )
    };
    DeviceFlags {
        ctrl_flags,
        mode,
        reason,
        missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECOVERY: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

    #[test]
    fn zero_copy_when_offered() {
        let f = RECOVERY
            | u64::from(sys::UBLK_F_AUTO_BUF_REG)
            | u64::from(sys::UBLK_F_CMD_IOCTL_ENCODE);
        let d = choose_device_flags(Some(f), false);
        assert_eq!(d.mode, DataMode::ZeroCopy);
        assert_eq!(d.ctrl_flags, f);
        assert!(d.missing.is_empty());
        assert_eq!(DataMode::of_device_flags(d.ctrl_flags), DataMode::ZeroCopy);
    }

    #[test]
    fn copy_when_forced_or_not_offered() {
        let f = RECOVERY | u64::from(sys::UBLK_F_AUTO_BUF_REG);
        let d = choose_device_flags(Some(f), true);
        assert_eq!(d.mode, DataMode::Copy);
        assert_eq!(d.ctrl_flags & u64::from(sys::UBLK_F_AUTO_BUF_REG), 0);
        let d = choose_device_flags(Some(RECOVERY), false);
        assert_eq!(d.mode, DataMode::Copy);
        assert_eq!(d.ctrl_flags, RECOVERY);
        assert_eq!(DataMode::of_device_flags(d.ctrl_flags), DataMode::Copy);
    }

    #[test]
    fn unknown_features_still_ask_for_recovery() {
        let d = choose_device_flags(None, false);
        assert_eq!(d.mode, DataMode::Copy);
        assert_eq!(d.ctrl_flags, RECOVERY);
    }

    #[test]
    fn update_size_needs_the_feature_bit() {
        assert!(can_update_size(Some(u64::from(sys::UBLK_F_UPDATE_SIZE))));
        assert!(!can_update_size(Some(RECOVERY)));
        assert!(!can_update_size(None));
    }

    #[test]
    fn missing_recovery_is_reported() {
        let d = choose_device_flags(Some(u64::from(sys::UBLK_F_USER_RECOVERY)), false);
        assert_eq!(d.missing, vec!["UBLK_F_USER_RECOVERY_REISSUE"]);
        assert_eq!(d.ctrl_flags, u64::from(sys::UBLK_F_USER_RECOVERY));
    }
}
