#!/bin/bash
# Failing disk: the volume folder is on ext4 over a device-mapper device whose table is
# swapped between `linear` (healthy) and `error` (every I/O fails with EIO).
# 1. 16 MiB written with fio verify headers and flushed.
# 2. Read fault: with the table at `error`, reads of the device fail with EIO (never
#    wrong data: fio's verification reports no bad block), the daemon stays up and
#    `status` counts the errors; table healthy again: everything reads back, no restart.
# 3. Write fault: more writes, then the table at `error`: writes fail with EIO, a flush
#    fails, and once the table is healthy again the next flushes still fail (the failed
#    sync may have dropped data: a flush is never reported done for it). The ext4 under
#    the folder aborted its journal: stop the daemon, fsck, remount, serve again: the
#    data flushed in step 1 reads back exactly. (ext4 may stop on the read errors of
#    step 2 already, when they hit its metadata: then it is remounted the same way
#    before step 3.)
# timeout: 240
set -euo pipefail
. "$GUEST_LIB"

# flush_dev: fsync the device (a FLUSH request to the daemon; BLKFLSBUF would send none).
flush_dev() {
    dd if=/dev/null of="$DEV" conv=fsync,notrunc status=none
}

need_cmd fio mkfs.ext4 e2fsck losetup blockdev dmsetup
load_ublk
modprobe_mod loop || true
modprobe_mod dm-mod || true
modprobe_mod ext4 || fail "cannot load ext4"
[ -e /dev/mapper/control ] || dmsetup mknodes 2>/dev/null || true
[ -e /dev/mapper/control ] || skip "no device-mapper in this kernel"

dm=snapblk-failing
mnt="$WORK/disk"
cleanup() {
    local rc=$?
    trap - EXIT
    set +e
    [ -n "${SERVE_PID:-}" ] && kill -TERM "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    umount "$mnt" 2>/dev/null
    dmsetup remove "$dm" 2>/dev/null
    [ -n "${loopdev:-}" ] && losetup -d "$loopdev"
    exit "$rc"
}
trap cleanup EXIT

truncate -s 96M "$WORK/disk.img"
loopdev=$(losetup -f --show "$WORK/disk.img")
sectors=$(blockdev --getsz "$loopdev")
healthy="0 $sectors linear $loopdev 0"
failing="0 $sectors error"
dmsetup create "$dm" --table "$healthy"
dmsetup mknodes
disk=/dev/mapper/$dm
table() {
    dmsetup suspend --nolockfs "$dm" && dmsetup load "$dm" --table "$1" && dmsetup resume "$dm"
}
mkfs.ext4 -q -F "$disk"
mkdir -p "$mnt"
mount -t ext4 -o noatime "$disk" "$mnt"
vol="$mnt/vol"
"$SNAPBLK" volume create "$vol" --size 48M
start_serve "$vol" serve

fio_a=(--name=a --filename="$DEV" --direct=1 --ioengine=io_uring --bs=64k --size=16M
    --verify=crc32c --verify_fatal=1)
fio "${fio_a[@]}" --rw=write --iodepth=8 --do_verify=1 --end_fsync=1 >"$RESULTS/fio-a.txt" 2>&1 ||
    fail "the healthy write of 16 MiB failed: $(tail -5 "$RESULTS/fio-a.txt")"
flush_dev || fail "a healthy flush failed"
info "step 1: 16 MiB written, verified, flushed"

# 2. Read fault.
table "$failing"
rc=0
dd if="$DEV" of=/dev/null bs=64k count=16 iflag=direct 2>"$RESULTS/dd-read.err" || rc=$?
info "read during the fault: status $rc, $(grep -o 'Input/output error' "$RESULTS/dd-read.err" | head -1)"
[ "$rc" != 0 ] && grep -q 'Input/output error' "$RESULTS/dd-read.err" ||
    fail "a read of a failing disk did not fail with EIO: $(cat "$RESULTS/dd-read.err")"
rc=0
fio "${fio_a[@]}" --rw=read --iodepth=4 --verify_only --verify_fatal=0 \
    >"$RESULTS/fio-read-fault.txt" 2>&1 || rc=$?
grep -q 'verify: bad' "$RESULTS/fio-read-fault.txt" && fail "a read of a failing disk returned wrong data"
[ "$rc" != 0 ] || fail "fio read a failing disk without an error"
info "fio verify during the fault: errors only ($(grep -o 'err= *[0-9]*[^,]*' "$RESULTS/fio-read-fault.txt" | head -1))"
kill -0 "$SERVE_PID" 2>/dev/null || fail "the daemon died on read errors"
"$SNAPBLK" status -V "$vol" >"$RESULTS/status-read-fault.txt" || fail "status failed during the fault"
grep -q '^disk errors [1-9]' "$RESULTS/status-read-fault.txt" || fail "status counts no disk error: $(cat "$RESULTS/status-read-fault.txt")"
table "$healthy"
fio "${fio_a[@]}" --rw=read --iodepth=4 --verify_only >"$RESULTS/fio-read-after.txt" 2>&1 ||
    fail "after the read fault the data does not verify: $(tail -5 "$RESULTS/fio-read-after.txt")"
info "step 2: reads failed with EIO during the fault, all data verifies after it"

# ext4 may have met the read errors too (its metadata) and gone read-only: repair and
# remount it under a stopped daemon, then serve again.
remount() {
    kill -TERM "$SERVE_PID"
    wait "$SERVE_PID" || info "daemon exit status $? (its last flush failed)"
    SERVE_PID=
    for _ in $(seq 50); do [ -e "$DEV" ] || break; sleep 0.1; done
    umount "$mnt"
    e2fsck -fy "$disk" >>"$RESULTS/fsck.txt" 2>&1 || info "e2fsck repaired the file system (status $?)"
    mount -t ext4 -o noatime "$disk" "$mnt"
    start_serve "$vol" "$1"
    fio "${fio_a[@]}" --rw=read --iodepth=4 --verify_only >"$RESULTS/fio-read-$1.txt" 2>&1 ||
        fail "data flushed before the faults does not read back: $(tail -5 "$RESULTS/fio-read-$1.txt")"
}
if grep -q " $mnt ext4 ro" /proc/self/mounts || dmesg | grep -q 'EXT4-fs error\|Remounting filesystem read-only'; then
    info "ext4 under the folder stopped after the read errors: remounting it"
    remount serve-2
fi

# 3. Write fault.
fio --name=b --filename="$DEV" --direct=1 --ioengine=io_uring --bs=64k --offset=16M --size=8M \
    --rw=write --iodepth=8 >"$RESULTS/fio-b.txt" 2>&1 || fail "the write of 8 MiB failed"
table "$failing"
rc=0
dd if=/dev/urandom of="$DEV" bs=64k seek=$((32 * 16)) count=16 oflag=direct 2>"$RESULTS/dd-write.err" || rc=$?
info "write during the fault: status $rc, $(grep -o 'Input/output error' "$RESULTS/dd-write.err" | head -1)"
rc=0
flush_dev 2>"$RESULTS/flush-fault.err" || rc=$?
[ "$rc" != 0 ] || fail "a flush reported done while the disk failed"
info "flush during the fault: $(cat "$RESULTS/flush-fault.err")"
kill -0 "$SERVE_PID" 2>/dev/null || fail "the daemon died on write errors"
table "$healthy"
for i in 1 2; do
    rc=0
    flush_dev 2>"$RESULTS/flush-after-$i.err" || rc=$?
    [ "$rc" != 0 ] || fail "flush $i after the fault reported done for data a failed sync may have lost"
done
"$SNAPBLK" status -V "$vol" >"$RESULTS/status-write-fault.txt"
grep -q '^FLUSH FAILED' "$RESULTS/status-write-fault.txt" || fail "status does not say the flush failed"
info "step 3: writes and flushes failed; flushes keep failing after the fault cleared"

remount serve-3
flush_dev || fail "a flush after the restart failed"
stop_serve
SERVE_PID=
info "failing disk: EIO to the consumer, never wrong data; flushed data intact after the restart"
