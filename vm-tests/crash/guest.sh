#!/bin/bash
# One boot of the power-loss test (vm-tests/crash-run), run by lib/init in place of
# the test runner. The volume folder lives on /dev/vda, a disk image on the host that
# outlives the VM. Settings come from guest.env (written by crash-run):
#   CRASH_CHECK=1      the previous boot was killed: check what it left (file system
#                      CRASH_PREV_UNDER under the folder, CRASH_PREV_IN inside the
#                      volume) against $R/expect, the host's record of every
#                      acknowledgement received before the kill
#   CRASH_FRESH=1      then format the disk (CRASH_UNDER), create the volume and make
#                      CRASH_IN in it; otherwise go on with the volume checked
#   CRASH_WRITE=1      then append records and take snapshots until the host kills
#                      the VM; otherwise stop everything cleanly and power off
# Acknowledgements go to the second serial port (a file on the host), each only after
# what it names is durable: "start", "ack N", "snap NAME ACKED" (ACKED: records
# acknowledged before the create began), "snapsum NAME COUNT SHA" (its intact records
# and the hash of the records file in it, read back once taken, or in the next boot),
# "snapdel NAME" (sent before the delete starts). Results: $R/check.txt, $R/failed.
set -uo pipefail

R="$VM_DIR/results"
RESULTS="$R"
MODTREE="$VM_DIR/modtree"
KERNEL_VERSION="$(uname -r)"
GUEST_LIB="$REPO/vm-tests/guest/lib.sh"
RECORDS="$REPO/vm-tests/crash/records.py"
DISK=/dev/vda
DATA=/run/crash/data
MNT=/run/crash/mnt
SMNT=/run/crash/smnt
VOL="$DATA/vol"
ACK=/dev/ttyS1
export PATH="$BIN_DIR:$PATH" HOME=/run/crash WORK=/run/crash RUST_BACKTRACE=1
SNAPS_KEPT=3
mkdir -p "$WORK"
cut -d' ' -f1 /proc/uptime >"$R/runner.started"

# shellcheck source=../guest/lib.sh
. "$GUEST_LIB"

say() { printf '[%s] %s\n' "$(cut -d' ' -f1 /proc/uptime)" "$*"; }
ack() { printf '%s\n' "$*" >&9; }
# snapshot_names: the volume's snapshots, oldest first, one a line.
snapshot_names() {
    local out
    out="$("$SNAPBLK" snapshot list -V "$VOL")" || fail "cannot list snapshots"
    [ "$out" = "no snapshots" ] || awk 'NR > 1 { print $2 }' <<<"$out"
}

# mkfs_on FS DEV
mkfs_on() {
    case "$1" in
        ext4) mkfs.ext4 -q -F "$2" ;;
        xfs) mkfs.xfs -q -f "$2" ;;
        *) fail "unknown file system $1" ;;
    esac
}

# replay_and_fsck FS DEV WHAT: what a reboot does (mount: the journal or log is
# replayed; umount), then a read-only check that must find nothing.
replay_and_fsck() {
    local fs="$1" dev="$2" what="$3" out="$R/fsck-$3.txt" rc=0
    mkdir -p /run/crash/replay
    mount -t "$fs" "$dev" /run/crash/replay 2>"$out" || fail "$what: $fs does not mount after the power loss: $(cat "$out")"
    umount /run/crash/replay || fail "$what: cannot unmount"
    case "$fs" in
        ext4) e2fsck -fn "$dev" >"$out" 2>&1 || rc=$? ;;
        xfs) xfs_repair -n "$dev" >"$out" 2>&1 || rc=$? ;;
    esac
    [ "$rc" = 0 ] || fail "$what: ${fs} check found damage (status $rc): $(tail -n 15 "$out")"
    say "$what: $fs clean"
}

# mount_snapshot NAME FS: expose NAME read-only and mount it on $SMNT (the frozen
# image: no journal replay). Sets SDEV.
mount_snapshot() {
    local name="$1" fs="$2" opts
    SDEV="$("$SNAPBLK" snapshot expose "$name" -V "$VOL" | sed -n 's|^snapshot .* exposed read-only as \(/dev/ublkb[0-9]*\)$|\1|p')"
    [ -n "$SDEV" ] || fail "cannot expose snapshot $name"
    wait_for_file "$SDEV" 10 || fail "$SDEV did not appear for snapshot $name"
    case "$fs" in
        ext4) opts=ro,noload ;;
        xfs) opts=ro,norecovery,nouuid ;;
    esac
    mount -t "$fs" -o "$opts" "$SDEV" "$SMNT" 2>"$R/smount.err" ||
        fail "snapshot $name does not mount: $(cat "$R/smount.err")"
}

unmount_snapshot() {
    umount "$SMNT" || fail "cannot unmount snapshot $1"
    "$SNAPBLK" snapshot unexpose "$1" -V "$VOL" >/dev/null || fail "cannot unexpose snapshot $1"
}

start_volume() {
    start_serve "$VOL" "serve-$CRASH_CYCLE"
    say "serving $VOL as $DEV"
}

# check_previous: everything the previous boot acknowledged is there.
check_previous() {
    local fs_in="$CRASH_PREV_IN" want names listed=0 checked=0 name count sha got valid bad
    replay_and_fsck "$CRASH_PREV_UNDER" "$DISK" "under"
    mount -t "$CRASH_PREV_UNDER" "$DISK" "$DATA" || fail "cannot mount $DISK"
    start_volume
    replay_and_fsck "$fs_in" "$DEV" "inside"
    mount -t "$fs_in" "$DEV" "$MNT" || fail "cannot mount $DEV"
    want="$(sed -n 's/^records //p' "$R/expect")"
    read -r valid bad < <("$RECORDS" check "$MNT/records" "$want" | sed 's/[a-z]*=//g') ||
        fail "cannot read the records"
    say "records: $want acknowledged, $valid intact in a row, $bad acknowledged ones missing or damaged"
    names="$(snapshot_names | tr '\n' ' ')"
    while read -r kind name count sha; do
        case "$kind" in
            snap)
                listed=$((listed + 1))
                [[ " $names " == *" $name "* ]] || fail "snapshot $name was acknowledged but is not listed (listed: $names)"
                # Not read back before the kill: it must hold every record acknowledged
                # before it was taken; what it holds now must not change in later boots.
                grep -q "^snapsum $name " "$R/expect" && continue
                mount_snapshot "$name" "$fs_in"
                got="$("$RECORDS" sum "$SMNT/records")"
                unmount_snapshot "$name"
                [ "${got%% *}" -ge "$count" ] ||
                    fail "snapshot $name holds ${got%% *} records; $count were acknowledged before it was taken"
                ack "snapsum $name $got"
                checked=$((checked + 1))
                ;;
            snapsum)
                mount_snapshot "$name" "$fs_in"
                got="$("$RECORDS" sum "$SMNT/records")"
                unmount_snapshot "$name"
                [ "$got" = "$count $sha" ] || fail "snapshot $name changed: held $count records (sha256 $sha), now $got"
                checked=$((checked + 1))
                ;;
        esac
    done < <(grep -E '^snap(sum)? ' "$R/expect")
    printf 'records=%s lost=%s valid=%s snapshots_listed=%s snapshots_checked=%s\n' \
        "$want" "$bad" "$valid" "$listed" "$checked" >"$R/check.txt"
    [ "$bad" = 0 ] || fail "$bad of $want acknowledged records lost or damaged"
    say "snapshots: $listed acknowledged ones listed, $checked hold what they held"
}

stop_all() {
    umount "$MNT" || fail "cannot unmount $MNT"
    stop_serve
    umount "$DATA" || fail "cannot unmount $DATA"
}

fresh_volume() {
    say "new volume: $CRASH_UNDER under the folder, $CRASH_IN inside"
    mkfs_on "$CRASH_UNDER" "$DISK"
    mount -t "$CRASH_UNDER" "$DISK" "$DATA" || fail "cannot mount $DISK"
    # mkfs.xfs refuses file systems under 300 MiB.
    "$SNAPBLK" volume create "$VOL" --size 320M >/dev/null || fail "volume create failed"
    start_volume
    mkfs_on "$CRASH_IN" "$DEV"
    mount -t "$CRASH_IN" "$DEV" "$MNT" || fail "cannot mount $DEV"
}

# write_until_killed: a writer appends records; snapshots are taken meanwhile, each
# read back once taken (its record count and the hash of the records file in it),
# and the oldest deleted beyond SNAPS_KEPT.
write_until_killed() {
    local k=0 name before got oldest
    : >/run/crash/acked
    "$RECORDS" write "$MNT/records" "$ACK" /run/crash/acked &
    WRITER_PID=$!
    ack "start $CRASH_CYCLE"
    say "writing"
    while :; do
        sleep "0.$((RANDOM % 10))"
        kill -0 "$WRITER_PID" 2>/dev/null || fail "the writer stopped"
        k=$((k + 1))
        name="c$CRASH_CYCLE-$k"
        before="$(tr -d ' ' </run/crash/acked)"
        "$SNAPBLK" snapshot create "$name" -V "$VOL" >/dev/null || fail "snapshot create $name failed"
        ack "snap $name ${before:-0}"
        mount_snapshot "$name" "$CRASH_IN"
        got="$("$RECORDS" sum "$SMNT/records")"
        unmount_snapshot "$name"
        [ "${got%% *}" -ge "${before:-0}" ] ||
            fail "snapshot $name holds ${got%% *} records; ${before} were acknowledged before it was taken"
        ack "snapsum $name $got"
        say "snapshot $name: $got"
        while :; do
            mapfile -t names < <(snapshot_names)
            [ "${#names[@]}" -gt "$SNAPS_KEPT" ] || break
            oldest="${names[0]}"
            ack "snapdel $oldest"
            "$SNAPBLK" snapshot delete "$oldest" -V "$VOL" >/dev/null || fail "snapshot delete $oldest failed"
        done
    done
}

main() {
    mkdir -p "$DATA" "$MNT" "$SMNT"
    # devtmpfs has no /dev/fd, which process substitution needs.
    [ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
    for m in virtio_blk $(printf '%s\n' "$CRASH_PREV_UNDER" "$CRASH_PREV_IN" "$CRASH_UNDER" "$CRASH_IN" | sort -u); do
        modprobe_mod "$m" || fail "cannot load $m"
    done
    load_ublk
    say "modules loaded"
    wait_for_file "$DISK" 10 || fail "no $DISK"
    stty -F "$ACK" 115200 raw -echo clocal || fail "cannot set up $ACK"
    exec 9>"$ACK" || fail "cannot open $ACK"
    if [ "$CRASH_CHECK" = 1 ]; then
        check_previous
        if [ "$CRASH_FRESH" = 1 ] || [ "$CRASH_WRITE" = 0 ]; then
            stop_all
        fi
    fi
    [ "$CRASH_WRITE" = 1 ] || return 0
    [ "$CRASH_FRESH" = 1 ] && fresh_volume
    write_until_killed
}

( main ) >"$R/guest.log" 2>&1
rc=$?
if [ "$rc" != 0 ]; then
    reason="$(grep '^FAIL: ' "$R/guest.log" | tail -n 1)"
    printf '%s\n' "${reason:-guest script exited with status $rc}" >"$R/failed"
fi
sync
cut -d' ' -f1 /proc/uptime >"$R/runner.done"
exit "$rc"
