#!/bin/bash
# Snapshots of a mounted ext4 and a mounted xfs under a continuous writer, each exposed
# read-only as its own /dev/ublkbN: 10 snapshots per file system; every one mounts
# read-only without journal or log recovery, holds every file whose checksum was
# recorded before it was taken (not synced by hand: the freeze must have made them
# durable), and passes e2fsck -fn / xfs_repair -n.
# ext4's freeze leaves a clean journal, so a plain read-only mount works (it would fail
# if the journal needed replaying). XFS's freeze writes everything in place but then
# deliberately logs a dummy record (so that a crash while frozen recomputes the lazy
# superblock counters): an image of a frozen XFS always looks "dirty" and a read-only
# device cannot replay it, so it is mounted with norecovery, and xfs_repair -n on it
# reports that log and the free-space/inode counters only the replay recomputes
# ("sb_fdblocks N, counted M"): those findings, and only those, are accepted (see
# xfs_check_clean below); the checksums prove nothing else was needed from the log.
# Exposure rules: the device is read-only, exposing twice gives the same device, a
# snapshot cannot be deleted while exposed, unexpose removes the device, and stopping the
# daemon removes a snapshot device still exposed.
# timeout: 1500
set -euo pipefail
. "$GUEST_LIB"

need_cmd mkfs.ext4 mkfs.xfs e2fsck xfs_repair blockdev sha256sum python3 jq
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"
modprobe_mod xfs || fail "cannot load xfs"

# SNAP_TEST_FS / SNAP_TEST_COUNT narrow the test down when debugging it by hand.
SNAPS=${SNAP_TEST_COUNT:-10}
WRITER_PID=""
cleanup() {
    [ -n "$WRITER_PID" ] && kill "$WRITER_PID" 2>/dev/null || true
    for m in "$WORK"/smnt "$WORK"/mnt-*; do umount "$m" 2>/dev/null || true; done
}
trap cleanup EXIT

# xfs_check_clean DEV OUT: xfs_repair -n finds nothing on DEV but what a frozen XFS
# leaves for log replay (the dirty-log alert, the lazy superblock counters).
xfs_check_clean() {
    local rc=0
    xfs_repair -n "$1" >"$2" 2>&1 || rc=$?
    [ "$rc" = 0 ] && return 0
    [ "$rc" = 1 ] || return 1
    ! grep -v -E '^(Phase [0-9]|        - |No modify flag set|ALERT: The filesystem has valuable metadata changes in a log|ignored because the -n option was used|which may be resolved by first mounting|sb_(fdblocks|icount|ifree) [0-9]+, counted [0-9]+$)' "$2"
}

for fs in ${SNAP_TEST_FS:-ext4 xfs}; do
    vol="$WORK/vol-$fs"
    mnt="$WORK/mnt-$fs"
    sock="$WORK/$fs.sock"
    smnt="$WORK/smnt"
    mkdir -p "$mnt" "$smnt"
    # mkfs.xfs refuses file systems under 300 MiB.
    "$SNAPBLK" volume create "$vol" --size 320M
    start_serve "$vol" "serve-$fs" --socket "$sock"
    case "$fs" in
        ext4) mkfs.ext4 -q -F "$DEV" ;;
        xfs) mkfs.xfs -q -f "$DEV" ;;
    esac
    mount -t "$fs" "$DEV" "$mnt"

    info "$fs: $SNAPS snapshots under a continuous writer"
    start_writer "$mnt" 200 20
    : >"$WORK/sums"
    : >"$RESULTS/frozen-$fs.txt"
    for n in $(seq 1 "$SNAPS"); do
        head -c $(((RANDOM % 256 + 1) * 1024)) /dev/urandom >"$mnt/pre-$n"
        ( cd "$mnt" && sha256sum "pre-$n" ) >>"$WORK/sums"
        cp "$WORK/sums" "$WORK/sums-$n"
        "$SNAPBLK" snapshot create "s$n" -V "$vol" --socket "$sock" -o json >"$WORK/create.json" ||
            fail "snapshot s$n failed: $(cat "$WORK/create.json")"
        json '.consistency' <"$WORK/create.json" | grep -q '^application-consistent' ||
            fail "s$n was not frozen: $(cat "$WORK/create.json")"
        json '"\(.frozen_ms) \(.cut_ms)"' <"$WORK/create.json" >>"$RESULTS/frozen-$fs.txt"
    done
    sort -n "$RESULTS/frozen-$fs.txt" | awk -v fs="$fs" '{f[NR]=$1; c[NR]=$2} END {printf "%s: frozen ms: median %.2f max %.2f; cut ms: median %.2f\n", fs, f[int((NR+1)/2)], f[NR], c[int((NR+1)/2)]}' |
        tee -a "$RESULTS/freeze-figures.txt"

    info "$fs: exposure rules"
    out=$("$SNAPBLK" snapshot expose s1 -V "$vol" --socket "$sock" -o json)
    sdev=$(echo "$out" | json '.device')
    [ "$sdev" != "$DEV" ] || fail "the snapshot got the volume's own device"
    wait_for_file "$sdev" 10 || fail "$sdev did not appear"
    [ "$(blockdev --getro "$sdev")" = 1 ] || fail "$sdev is not read-only"
    if dd if=/dev/zero of="$sdev" bs=4k count=1 oflag=direct 2>/dev/null; then
        fail "a write to the read-only snapshot device succeeded"
    fi
    again=$("$SNAPBLK" snapshot expose s1 -V "$vol" --socket "$sock" -o json | json '.device')
    [ "$again" = "$sdev" ] || fail "exposing twice gave $again, then $sdev"
    "$SNAPBLK" status -V "$vol" --socket "$sock" -o json | json '.exposed.s1' | grep -qx "$sdev" ||
        fail "status does not list the exposed snapshot"
    out=$("$SNAPBLK" snapshot delete s1 -V "$vol" --socket "$sock" 2>&1) && fail "an exposed snapshot was deleted"
    echo "$out" | grep -q "is exposed as $sdev; unexpose it first" || fail "unclear refusal: $out"
    "$SNAPBLK" snapshot unexpose s1 -V "$vol" --socket "$sock" | grep -q "unexposed" || fail "unexpose said nothing"
    for _ in $(seq 50); do [ -e "$sdev" ] || break; sleep 0.1; done
    [ ! -e "$sdev" ] || fail "$sdev still exists after unexpose"
    out=$("$SNAPBLK" snapshot unexpose s1 -V "$vol" --socket "$sock" 2>&1) && fail "unexposed twice"
    echo "$out" | grep -q "is not exposed" || fail "unclear refusal: $out"

    info "$fs: every snapshot, exposed, mounts read-only, holds its files and checks clean"
    for n in $(seq 1 "$SNAPS"); do
        sdev=$("$SNAPBLK" snapshot expose "s$n" -V "$vol" --socket "$sock" -o json | json '.device')
        wait_for_file "$sdev" 10 || fail "$sdev did not appear for s$n"
        case "$fs" in
            ext4) mount -t ext4 -o ro "$sdev" "$smnt" 2>"$WORK/mount.err" ;;
            # The snapshot has the same UUID as the mounted origin.
            xfs) mount -t xfs -o ro,norecovery,nouuid "$sdev" "$smnt" 2>"$WORK/mount.err" ;;
        esac || fail "snapshot s$n does not mount read-only: $(cat "$WORK/mount.err"; dmesg | tail -5)"
        ( cd "$smnt" && sha256sum -c --quiet "$WORK/sums-$n" ) || fail "files recorded before s$n differ in it"
        umount "$smnt"
        case "$fs" in
            ext4) e2fsck -fn "$sdev" >"$RESULTS/fsck-$fs-s$n.txt" 2>&1 ;;
            xfs) xfs_check_clean "$sdev" "$RESULTS/fsck-$fs-s$n.txt" ;;
        esac || fail "$fs check of s$n: $(cat "$RESULTS/fsck-$fs-s$n.txt")"
        "$SNAPBLK" snapshot unexpose "s$n" -V "$vol" --socket "$sock" >/dev/null
    done
    kill "$WRITER_PID"; wait "$WRITER_PID" 2>/dev/null || true; WRITER_PID=""
    info "$fs: all $SNAPS snapshots verified"

    info "$fs: stopping the daemon removes a snapshot still exposed"
    sdev=$("$SNAPBLK" snapshot expose "s$SNAPS" -V "$vol" --socket "$sock" -o json | json '.device')
    wait_for_file "$sdev" 10 || fail "$sdev did not appear"
    sync
    umount "$mnt"
    stop_serve
    [ ! -e "$sdev" ] || fail "$sdev outlived the daemon"
done
info "ok"
