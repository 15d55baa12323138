#!/bin/bash
# File systems on a served volume: mkfs.ext4 and mkfs.xfs, mount, write a tree of files
# with checksums, sync, umount, remount and verify; then restart the daemon and verify
# again (the data went through the engine's flush, not only the page cache).
# timeout: 900
set -euo pipefail
. "$GUEST_LIB"

need_cmd mkfs.ext4 mkfs.xfs sha256sum
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"
modprobe_mod xfs || fail "cannot load xfs"

# make_tree DIR: a few levels of directories with files from 1 byte to 1 MiB.
make_tree() {
    local dir="$1" d f size
    for d in a a/b a/b/c d e/f; do
        mkdir -p "$dir/$d"
        for f in 1 2 3 4; do
            size=$(((RANDOM % 1024 + 1) * (f * f * f)))
            head -c "$size" /dev/urandom >"$dir/$d/file$f"
        done
    done
    head -c $((8 << 20)) /dev/urandom >"$dir/big"
    : >"$dir/empty"
    ln -s a/b/c/file1 "$dir/link"
}

# verify_tree MNT SUMS WHAT
verify_tree() {
    (cd "$1" && sha256sum -c --quiet "$2") || fail "checksums differ $3"
    info "all files verified $3"
}

for fs in ext4 xfs; do
    vol="$WORK/vol-$fs"
    mnt="$WORK/mnt-$fs"
    sums="$WORK/sums-$fs"
    mkdir -p "$mnt"
    # mkfs.xfs refuses file systems under 300 MiB.
    size=128M
    [ "$fs" = xfs ] && size=320M
    "$SNAPBLK" volume create "$vol" --size "$size"
    start_serve "$vol" "serve-$fs-1"
    case "$fs" in
        ext4) mkfs.ext4 -q -F "$DEV" ;;
        xfs) mkfs.xfs -q -f "$DEV" ;;
    esac
    mount -t "$fs" "$DEV" "$mnt"
    make_tree "$mnt"
    (cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$sums"
    info "$fs: $(wc -l <"$sums") files written"
    sync
    umount "$mnt"
    mount -t "$fs" "$DEV" "$mnt"
    verify_tree "$mnt" "$sums" "after remount ($fs)"
    umount "$mnt"
    stop_serve

    start_serve "$vol" "serve-$fs-2"
    mount -t "$fs" "$DEV" "$mnt"
    verify_tree "$mnt" "$sums" "after a daemon restart ($fs)"
    umount "$mnt"
    case "$fs" in
        ext4) e2fsck -fn "$DEV" >"$RESULTS/fsck-$fs.txt" 2>&1 || fail "e2fsck found problems" ;;
        xfs) xfs_repair -n "$DEV" >"$RESULTS/fsck-$fs.txt" 2>&1 || fail "xfs_repair -n found problems" ;;
    esac
    stop_serve
done
