#!/bin/bash
# The VM itself: ublk driver, file system modules and the tools later tests use.
# timeout: 120
set -euo pipefail
# shellcheck source=vm-tests/guest/lib.sh
. "$GUEST_LIB"

info "kernel $(uname -r)"

load_ublk
[ -c /dev/ublk-control ] || fail "/dev/ublk-control is not a character device"
info "ublk_drv loaded, /dev/ublk-control present"

for mod in ext4 xfs loop; do
    modprobe_mod "$mod" || fail "cannot load $mod"
done
for fs in ext4 xfs; do
    grep -qw "$fs" /proc/filesystems || fail "$fs is not in /proc/filesystems after loading it"
done
info "ext4, xfs and loop load"

need_cmd fio mkfs.ext4 mkfs.xfs fsfreeze blkdiscard e2fsck dmesg
info "fio, mkfs.ext4, mkfs.xfs, fsfreeze, blkdiscard, e2fsck present"

# The guest writes only to tmpfs (and the results share).
for d in /tmp /run /dev/shm "$WORK"; do
    [ "$(stat -f -c %T "$d")" = tmpfs ] || fail "$d is not on tmpfs"
    { touch "$d/.write-test" && rm "$d/.write-test"; } || fail "$d is not writable"
done
# $RESULTS is kept on the host after the run.
{
    echo "kernel: $(uname -r)"
    echo "fio: $(fio --version)"
    echo "xfsprogs: $(mkfs.xfs -V)"
} >"$RESULTS/versions.txt" || fail "cannot write to \$RESULTS"

[ -x "$SNAPBLK" ] || fail "snapblk binary not found at $SNAPBLK"
info "snapblk binary at $SNAPBLK"
