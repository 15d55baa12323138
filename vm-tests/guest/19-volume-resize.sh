#!/bin/bash
# Growing a volume. Served, with ext4 mounted and a checksummed file on it, through the
# control socket: on a driver with UBLK_F_UPDATE_SIZE (Linux 6.16+) the device shows the
# new size at once, resize2fs grows the mounted file system online, df shows it, the new
# space takes data, the file still checks, and a snapshot taken before keeps its size;
# on an older driver the request is refused with a clear message and nothing changes.
# Not served: the folder grows, and serving it gives a device of the new size. A clone
# of the snapshot taken before the grow, made through the daemon, has the old size and
# holds the file.
# timeout: 900
set -euo pipefail
. "$GUEST_LIB"

need_cmd mkfs.ext4 resize2fs e2fsck blockdev df sha256sum jq
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"

MNT="$WORK/mnt"
SOCK="$WORK/vol.sock"
MIB=$((1024 * 1024))
cleanup() {
    umount "$MNT" 2>/dev/null || true
}
trap cleanup EXIT

volume_size() { "$SNAPBLK" status -V vol --socket "$SOCK" -o json | json '.volume.size'; }
device_size() { blockdev --getsize64 "$DEV"; }
fs_size() { df -B1 --output=size "$MNT" | tail -n 1 | tr -d ' '; }
check_file() { (cd "$MNT" && sha256sum -c --quiet "$WORK/sums") || fail "$1: the file changed"; }

"$SNAPBLK" volume create "$WORK/vol" --size 128M
start_serve "$WORK/vol" serve-1 --socket "$SOCK"
features=$(grep -o 'features=0x[0-9a-f]*' "$RESULTS/serve-1.log" | head -n 1 | cut -d= -f2)
[ -n "$features" ] || fail "no driver features in the serve log"
online=0
if ((features & 1024)); then online=1; fi # UBLK_F_UPDATE_SIZE
info "kernel $KERNEL_VERSION, driver features $features, online growth: $online"

mkfs.ext4 -q -F "$DEV"
mkdir -p "$MNT"
mount "$DEV" "$MNT"
head -c 8M /dev/urandom >"$MNT/data"
sync
(cd "$MNT" && sha256sum data) >"$WORK/sums"
"$SNAPBLK" snapshot create before -V vol --socket "$SOCK" >/dev/null
[ "$(device_size)" = $((128 * MIB)) ] || fail "device is $(device_size) bytes, not 128 MiB"
fs_before=$(fs_size)

if [ "$online" = 1 ]; then
    info "grow the served volume to 384 MiB"
    "$SNAPBLK" volume resize vol --socket "$SOCK" --size 384M >"$WORK/resize.out" 2>&1 ||
        fail "resize failed: $(cat "$WORK/resize.out")"
    grep -q "the device has grown" "$WORK/resize.out" || fail "unclear answer: $(cat "$WORK/resize.out")"
    [ "$(device_size)" = $((384 * MIB)) ] || fail "device is $(device_size) bytes after the grow"
    [ "$(volume_size)" = $((384 * MIB)) ] || fail "status says $(volume_size) bytes after the grow"
    resize2fs "$DEV" >"$WORK/resize2fs.out" 2>&1 || fail "online resize2fs failed: $(cat "$WORK/resize2fs.out")"
    fs_after=$(fs_size)
    info "file system: $fs_before -> $fs_after bytes"
    [ "$fs_after" -gt $((fs_before + 200 * MIB)) ] || fail "df shows $fs_after bytes (was $fs_before)"
    check_file "after the online grow"
    # More than the old file system could hold: the new space takes data.
    head -c 160M /dev/urandom >"$MNT/fill" || fail "cannot fill the new space"
    sync
    check_file "after filling"
    "$SNAPBLK" snapshot show before -V vol --socket "$SOCK" -o json | json '.size' |
        grep -qx $((128 * MIB)) || fail "the snapshot taken before the grow changed size"
    "$SNAPBLK" volume resize vol --socket "$SOCK" --size 384M >/dev/null || fail "the same size again failed"
    out=$("$SNAPBLK" volume resize vol --socket "$SOCK" --size 256M 2>&1) && fail "a shrink was accepted"
    echo "$out" | grep -q "shrink" || fail "unclear refusal of a shrink: $out"
    [ "$(device_size)" = $((384 * MIB)) ] || fail "device changed size after refusals"
    rm -f "$MNT/fill"
else
    info "grow the served volume: refused by this driver"
    out=$("$SNAPBLK" volume resize vol --socket "$SOCK" --size 384M 2>&1) &&
        fail "a grow was accepted by a driver without UBLK_F_UPDATE_SIZE: $out"
    info "refusal: $out"
    echo "$out" | grep -q "needs Linux 6.16+" || fail "refusal does not name the kernel: $out"
    echo "$out" | grep -q "UBLK_F_UPDATE_SIZE" || fail "refusal does not name the feature: $out"
    echo "$out" | grep -q "volume resize DIR" || fail "refusal does not say what to do: $out"
    [ "$(volume_size)" = $((128 * MIB)) ] || fail "the volume grew although the request was refused"
    [ "$(device_size)" = $((128 * MIB)) ] || fail "the device changed size"
    check_file "after the refusal"
fi
umount "$MNT"
e2fsck -fn "$DEV" >"$WORK/fsck-1.out" 2>&1 || fail "e2fsck after the online part: $(tail -5 "$WORK/fsck-1.out")"

info "clone the snapshot taken before, through the daemon"
"$SNAPBLK" volume clone vol before "$WORK/clone" --socket "$SOCK" || fail "clone through the daemon failed"
stop_serve

info "grow the volume while it is not served, to 512 MiB"
"$SNAPBLK" volume resize "$WORK/vol" --size 512M || fail "offline grow failed"
start_serve "$WORK/vol" serve-2 --socket "$SOCK"
[ "$(device_size)" = $((512 * MIB)) ] || fail "served after the grow, the device is $(device_size) bytes"
mount "$DEV" "$MNT"
resize2fs "$DEV" >"$WORK/resize2fs-2.out" 2>&1 || fail "resize2fs failed: $(cat "$WORK/resize2fs-2.out")"
[ "$(fs_size)" -gt $((450 * MIB)) ] || fail "df shows $(fs_size) bytes on a 512 MiB device"
check_file "after the offline grow"
umount "$MNT"
stop_serve

info "the clone has the snapshot's size and content"
"$SNAPBLK" volume status "$WORK/clone" -o json | json '.size' | grep -qx $((128 * MIB)) ||
    fail "the clone is not 128 MiB"
start_serve "$WORK/clone" serve-clone --socket "$WORK/clone.sock"
[ "$(device_size)" = $((128 * MIB)) ] || fail "the clone's device is $(device_size) bytes"
e2fsck -fn "$DEV" >"$WORK/fsck-clone.out" 2>&1 || fail "e2fsck of the clone: $(tail -5 "$WORK/fsck-clone.out")"
mount -o ro "$DEV" "$MNT"
check_file "in the clone"
umount "$MNT"
stop_serve
info "done"
