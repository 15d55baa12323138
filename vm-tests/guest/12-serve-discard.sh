#!/bin/bash
# DISCARD and WRITE_ZEROES through a served volume: a discarded range reads as zeros
# (the rest is untouched), blkdiscard -z zeroes a range, and fstrim on a mounted ext4
# frees the space of deleted files in the volume's head layer.
# timeout: 600
set -euo pipefail
. "$GUEST_LIB"

need_cmd blkdiscard fstrim mkfs.ext4 cmp
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"

# allocated_kib VOLDIR: space the volume's layer data files take on the host side.
allocated_kib() {
    du -k -c "$1"/layers/*.data | tail -n 1 | cut -f 1
}

MIB=$((1 << 20))
"$SNAPBLK" volume create "$WORK/vol" --size 64M
start_serve "$WORK/vol" serve-1
q="/sys/block/${DEV#/dev/}/queue"
info "discard_granularity $(cat "$q/discard_granularity"), discard_max_bytes $(cat "$q/discard_max_bytes"), write_zeroes_max_bytes $(cat "$q/write_zeroes_max_bytes")"
[ "$(cat "$q/discard_granularity")" = 4096 ] || fail "discard granularity is not the block size"
[ "$(cat "$q/discard_max_bytes")" -gt 0 ] || fail "the device does not accept discards"

# Fill the device, discard [8M, 24M), write zeroes to [40M, 44M).
head -c $((64 * MIB)) /dev/urandom >"$WORK/pattern"
dd if="$WORK/pattern" of="$DEV" bs=1M oflag=direct status=none
blkdiscard -o $((8 * MIB)) -l $((16 * MIB)) "$DEV"
blkdiscard -z -o $((40 * MIB)) -l $((4 * MIB)) "$DEV"
dd if="$DEV" of="$WORK/after" bs=1M iflag=direct status=none

zeros_at() { # OFFSET_MIB LEN_MIB
    cmp -s -n $(($2 * MIB)) -i $(($1 * MIB)):0 "$WORK/after" /dev/zero ||
        fail "[$1M, +$2M) does not read as zeros"
}
same_at() { # OFFSET_MIB LEN_MIB
    cmp -s -n $(($2 * MIB)) -i $(($1 * MIB)):$(($1 * MIB)) "$WORK/after" "$WORK/pattern" ||
        fail "[$1M, +$2M) changed although nothing was discarded there"
}
zeros_at 8 16
zeros_at 40 4
same_at 0 8
same_at 24 16
same_at 44 20
info "discarded and zeroed ranges read as zeros, the rest is intact"

# The same after a daemon restart (the discard is in the volume, not a cache).
stop_serve
start_serve "$WORK/vol" serve-2
dd if="$DEV" of="$WORK/after" bs=1M iflag=direct status=none
zeros_at 8 16
zeros_at 40 4
same_at 0 8
same_at 44 20
info "still so after a restart"

# fstrim on a mounted ext4 gives the space of deleted files back.
mkfs.ext4 -q -F -E nodiscard "$DEV"
mkdir -p "$WORK/mnt"
mount -t ext4 "$DEV" "$WORK/mnt"
head -c $((24 * MIB)) /dev/urandom >"$WORK/mnt/file"
sync
before=$(allocated_kib "$WORK/vol")
rm "$WORK/mnt/file"
sync
trimmed="$(fstrim -v "$WORK/mnt")" || fail "fstrim failed"
info "$trimmed"
sync
after=$(allocated_kib "$WORK/vol")
info "volume data files: ${before} KiB before, ${after} KiB after fstrim"
[ "$after" -lt $((before - 16 * 1024)) ] || fail "fstrim freed less than 16 MiB in the volume"
umount "$WORK/mnt"
e2fsck -fn "$DEV" >"$RESULTS/fsck.txt" 2>&1 || fail "e2fsck found problems after fstrim"
stop_serve
