#!/bin/bash
# Full disk: a 256 MiB thin volume in a folder on a 64 MiB ext4 (no reserved blocks).
# fio writes the device sequentially with verify headers until the file system fills:
# the write that cannot be stored fails with ENOSPC in fio, the daemon stays up,
# `status` (text and control socket JSON) says the disk is full, a snapshot fails
# cleanly and the list stays empty. Then a filler file is removed: every byte fio had
# acknowledged verifies, a new fio write+verify passes, a flush and a snapshot work, and
# status no longer says full.
# timeout: 240
set -euo pipefail
. "$GUEST_LIB"

# flush_dev: fsync the device (a FLUSH request to the daemon; BLKFLSBUF would send none).
flush_dev() {
    dd if=/dev/null of="$DEV" conv=fsync,notrunc status=none
}

need_cmd fio mkfs.ext4 losetup blockdev
load_ublk
modprobe_mod loop || true
modprobe_mod ext4 || fail "cannot load ext4"

mnt="$WORK/small"
cleanup() {
    local rc=$?
    trap - EXIT
    set +e
    [ -n "${SERVE_PID:-}" ] && kill -TERM "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    umount "$mnt" 2>/dev/null
    [ -n "${loopdev:-}" ] && losetup -d "$loopdev"
    exit "$rc"
}
trap cleanup EXIT

truncate -s 64M "$WORK/fs.img"
loopdev=$(losetup -f --show "$WORK/fs.img")
mkfs.ext4 -q -F -m 0 "$loopdev"
mkdir -p "$mnt"
mount -t ext4 -o noatime "$loopdev" "$mnt"
# The filler is what the operator frees later.
fallocate -l 12M "$mnt/filler"
vol="$mnt/vol"
"$SNAPBLK" volume create "$vol" --size 256M
start_serve "$vol" serve
info "volume of 256 MiB on $(df -h --output=avail "$mnt" | tail -1 | tr -d ' ') free, served as $DEV"

fio_common=(--filename="$DEV" --direct=1 --ioengine=io_uring --rw=write --bs=256k
    --verify=crc32c --verify_fatal=1)
rc=0
fio --name=fill "${fio_common[@]}" --iodepth=1 --size=200M --do_verify=0 \
    --output-format=json >"$RESULTS/fio-fill.json" 2>"$RESULTS/fio-fill.err" || rc=$?
[ "$rc" != 0 ] || fail "fio wrote 200 MiB through a 64 MiB file system"
err=$(awk '/"error" :/{gsub(/[^0-9]/,""); print; exit}' "$RESULTS/fio-fill.json")
acked=$(awk '/"write" :/{w=1} w && /"io_bytes"/{gsub(/[^0-9]/,""); print; exit}' "$RESULTS/fio-fill.json")
info "fio: error $err after $acked acknowledged bytes; $(grep -o 'No space left[^,]*' "$RESULTS/fio-fill.err" | head -1)"
[ "$err" = 28 ] || fail "fio's writes failed with error $err, not ENOSPC (28): $(cat "$RESULTS/fio-fill.err")"
[ "$acked" -ge $((24 << 20)) ] || fail "only $acked bytes were acknowledged"
kill -0 "$SERVE_PID" 2>/dev/null || fail "the daemon died on a full disk"

"$SNAPBLK" status -V "$vol" >"$RESULTS/status-full.txt" || fail "status failed on a full disk"
cat "$RESULTS/status-full.txt"
grep -q '^disk  *FULL (ENOSPC since .*refused)' "$RESULTS/status-full.txt" || fail "status does not say the disk is full"
"$SNAPBLK" status -V "$vol" -o json >"$RESULTS/status-full.json"
/usr/bin/python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))["volume"]
full = v["disk"].get("full")
assert full and full["refused"] >= 1, v["disk"]
assert "flush_failure" not in v, v["flush_failure"]
print("control socket: disk", v["disk"])
' "$RESULTS/status-full.json" || fail "the control socket status does not say full, or a flush failure latched"

# A flush may fail (the map journal cannot grow) or pass; it must not hang.
if timeout 30 dd if=/dev/null of="$DEV" conv=fsync,notrunc status=none 2>"$RESULTS/flush-full.err"; then
    info "flush on the full disk: done"
else
    info "flush on the full disk: $(cat "$RESULTS/flush-full.err")"
fi
# Fill what the flush may have freed (a failed temporary file), then take a snapshot.
dd if=/dev/zero of="$DEV" bs=256k seek=$((acked / 262144 + 8)) count=64 oflag=direct 2>/dev/null || true
rc=0
"$SNAPBLK" snapshot create s1 -V "$vol" >"$RESULTS/snap-full.out" 2>"$RESULTS/snap-full.err" || rc=$?
if [ "$rc" = 0 ]; then
    info "the snapshot fit in what was left: $(cat "$RESULTS/snap-full.out")"
    snaps_expected=s1
else
    info "snapshot on a full disk: $(tail -1 "$RESULTS/snap-full.err")"
    grep -qi 'no space\|full' "$RESULTS/snap-full.err" || fail "the snapshot's error does not say the disk is full"
    snaps_expected=""
fi
snaps=$("$SNAPBLK" snapshot list -V "$vol" -o json |
    /usr/bin/python3 -c 'import json, sys; print(" ".join(s["name"] for s in json.load(sys.stdin)))')
[ "$snaps" = "$snaps_expected" ] || fail "snapshots after the attempt: '$snaps', expected '$snaps_expected'"
kill -0 "$SERVE_PID" 2>/dev/null || fail "the daemon died"

info "freeing the 12 MiB filler"
rm -f "$mnt/filler"
fio --name=fill "${fio_common[@]}" --iodepth=4 --size="$acked" --verify_only \
    >"$RESULTS/fio-verify-acked.txt" 2>&1 || {
    tail -20 "$RESULTS/fio-verify-acked.txt" >&2
    fail "the $acked acknowledged bytes do not read back"
}
info "the $acked bytes fio had acknowledged verify"
fio --name=again "${fio_common[@]}" --iodepth=8 --size=8M --offset=$((acked / 262144 * 262144 + (16 << 20))) \
    --do_verify=1 >"$RESULTS/fio-again.txt" 2>&1 || {
    tail -20 "$RESULTS/fio-again.txt" >&2
    fail "write+verify after freeing space failed"
}
flush_dev || fail "a flush failed once space was back"
"$SNAPBLK" snapshot create s2 -V "$vol" >/dev/null || fail "a snapshot failed once space was back"
"$SNAPBLK" status -V "$vol" >"$RESULTS/status-after.txt"
cat "$RESULTS/status-after.txt"
grep -q '^disk  *ok' "$RESULTS/status-after.txt" || fail "status still says full with space back"
stop_serve
SERVE_PID=
info "full disk: ENOSPC to fio, daemon up, status full, space back: acknowledged data intact"
