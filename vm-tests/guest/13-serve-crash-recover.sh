#!/bin/bash
# Crash recovery: kill -9 the daemon while fio writes (and later verifies) a file on a
# mounted ext4, start `serve --recover`, and the same /dev/ublkbN carries on: fio
# completes with its verification, the file system stays mounted, and e2fsck is clean
# after umount. Round 1 writes with O_SYNC (every write is flushed: no flushed data may
# be lost) and finds the device from libublk's json; round 2 writes without sync (every
# acknowledged write must survive the daemon's death) and names the device with --id.
# timeout: 900
set -euo pipefail
. "$GUEST_LIB"

need_cmd fio mkfs.ext4 e2fsck
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"

# On failure, never leave a mounted file system on a device without a daemon (its
# I/O would wait forever): bring a daemon back if needed, unmount, stop it.
cleanup() {
    local rc=$?
    trap - EXIT
    set +e
    if [ "$rc" != 0 ] && grep -q " $mnt " /proc/self/mounts; then
        if ! kill -0 "${SERVE_PID:-0}" 2>/dev/null; then
            "$SNAPBLK" serve "$WORK/vol" --recover >/dev/null 2>"$RESULTS/serve-cleanup.log" &
            SERVE_PID=$!
            sleep 5
        fi
        [ -n "${fio_pid:-}" ] && kill -9 "$fio_pid" 2>/dev/null
        sleep 1
        umount "$mnt"
        kill -TERM "$SERVE_PID" 2>/dev/null
        wait "$SERVE_PID" 2>/dev/null
    fi
    exit "$rc"
}
mnt="$WORK/mnt"
trap cleanup EXIT

"$SNAPBLK" volume create "$WORK/vol" --size 192M
mkdir -p "$mnt"
start_serve "$WORK/vol" serve-first
first_dev="$DEV"
id="${DEV#/dev/ublkb}"
mkfs.ext4 -q -F "$DEV"
mount -t ext4 "$DEV" "$mnt"

for round in 1 2; do
    info "round $round: fio (sync=$((round == 1))) on $mnt, then kill -9 daemon $SERVE_PID"
    # Writes are rate limited so that the kill lands in the middle of them (about
    # 2200 writes at 400/s); the verification reads run at full speed.
    sync_opt=0
    [ "$round" = 1 ] && sync_opt=1
    fio --name="crash$round" --directory="$mnt" --size=48M --ioengine=io_uring --direct=1 \
        --rw=randwrite --bssplit=4k/50:16k/25:64k/25 --iodepth=16 --rate_iops=,400 \
        --sync="$sync_opt" --verify=crc32c --do_verify=1 --verify_fatal=1 \
        >"$RESULTS/fio-$round.txt" 2>&1 &
    fio_pid=$!
    # Let fio get well into its writes.
    sleep 3
    kill -0 "$fio_pid" 2>/dev/null || fail "fio ended before the crash: $(tail -5 "$RESULTS/fio-$round.txt")"
    kill -9 "$SERVE_PID"
    wait "$SERVE_PID" 2>/dev/null || true
    [ -e "$DEV" ] || fail "$DEV vanished when its daemon was killed"
    info "daemon killed; fio is waiting on $DEV"
    sleep 1
    kill -0 "$fio_pid" 2>/dev/null || fail "fio ended while no daemon served the device"

    if [ "$round" = 1 ]; then
        start_serve "$WORK/vol" "serve-recover-$round" --recover
    else
        start_serve "$WORK/vol" "serve-recover-$round" --recover --id "$id"
    fi
    [ "$DEV" = "$first_dev" ] || fail "recovered as $DEV, not $first_dev"
    grep -q 'reattached' "$RESULTS/serve-recover-$round.log" || fail "the new daemon did not reattach"
    info "new daemon $SERVE_PID serves $DEV again"

    rc=0
    wait "$fio_pid" || rc=$?
    if [ "$rc" != 0 ] || grep -Eq 'err= *[1-9]|verify: bad' "$RESULTS/fio-$round.txt"; then
        tail -30 "$RESULTS/fio-$round.txt" >&2
        dmesg | tail -30 >&2
        fail "fio failed across the crash (status $rc)"
    fi
    info "round $round: fio completed and verified"
    grep -q " $mnt " /proc/self/mounts || fail "the file system is no longer mounted"
    rm -f "$mnt"/crash*
done

umount "$mnt"
e2fsck -fn "$DEV" >"$RESULTS/fsck.txt" 2>&1 || {
    cat "$RESULTS/fsck.txt" >&2
    fail "e2fsck found problems after the crashes"
}
info "e2fsck clean"
stop_serve
