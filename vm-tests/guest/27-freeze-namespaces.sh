#!/bin/bash
# Freezing a file system mounted in another mount namespace than the daemon's: (1) ext4
# mounted inside `unshare -m` while the daemon runs in the initial namespace: the snapshot
# is application-consistent, frozen through /proc/PID/root, and a held freeze is seen
# from inside that namespace (fsfreeze there says it is frozen already); (2) the daemon
# in a namespace of its own, ext4 mounted in the initial one: found through /proc/1/root;
# (3) ext4 mounted in a namespace no process is in (kept by a bind mount of its nsfs
# file): --freeze auto is refused with a message saying the device is in use but no mount
# is visible, and --freeze none still works.
# timeout: 600
set -euo pipefail
. "$GUEST_LIB"

need_cmd mkfs.ext4 fsfreeze unshare nsenter jq
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"

SOCK="$WORK/vol.sock"
MNT="$WORK/mnt"
NSDIR=/run/snapblk-test-ns
HOLDER=""
cleanup() {
    [ -n "$HOLDER" ] && kill "$HOLDER" 2>/dev/null || true
    umount "$NSDIR/mnt" 2>/dev/null || true
    umount "$NSDIR" 2>/dev/null || true
    umount "$MNT" 2>/dev/null || true
    [ -n "${SERVE_PID:-}" ] && kill -TERM "$SERVE_PID" 2>/dev/null || true
}
trap cleanup EXIT

mkdir -p "$MNT"
"$SNAPBLK" volume create "$WORK/vol" --size 128M

info "1: daemon in the initial namespace, ext4 mounted in unshare -m"
start_serve "$WORK/vol" serve-1 --socket "$SOCK"
mkfs.ext4 -q -F "$DEV"
unshare -m --propagation private sh -c "mount -t ext4 '$DEV' '$MNT' && echo data >'$MNT/f' && echo ok >'$WORK/ready' && exec sleep 600" &
HOLDER=$!
wait_for_file "$WORK/ready" 30 || fail "the mount in the other namespace did not happen"
! grep -q " $MNT " /proc/self/mountinfo || fail "the mount leaked into the initial namespace"
"$SNAPBLK" snapshot create s1 -V vol --socket "$SOCK" -o json >"$WORK/s1.json" ||
    fail "snapshot failed: $(cat "$WORK/s1.json")"
json '.consistency' <"$WORK/s1.json" | grep -q '^application-consistent' ||
    fail "not frozen across namespaces: $(cat "$WORK/s1.json")"
json '.frozen_mounts[0]' <"$WORK/s1.json" | grep -qx "/proc/$HOLDER/root$MNT" ||
    fail "froze an unexpected path: $(cat "$WORK/s1.json")"
# A held freeze really freezes the file system the other namespace sees.
mkfifo "$WORK/hold"
"$SNAPBLK" freeze -V vol --socket "$SOCK" --timeout 30s <"$WORK/hold" 2>"$WORK/freeze.err" &
FREEZER=$!
exec 9>"$WORK/hold"
for _ in $(seq 100); do grep -q '^frozen' "$WORK/freeze.err" && break; sleep 0.1; done
grep -q '^frozen' "$WORK/freeze.err" || fail "freeze did not happen: $(cat "$WORK/freeze.err")"
if nsenter -t "$HOLDER" -m -r -w fsfreeze -f "$MNT" 2>"$WORK/fsfreeze.err"; then
    nsenter -t "$HOLDER" -m -r -w fsfreeze -u "$MNT" || true
    fail "the file system in the other namespace was not frozen"
fi
info "fsfreeze inside the namespace while held: $(cat "$WORK/fsfreeze.err")"
exec 9>&-
wait "$FREEZER" || fail "the freeze command failed"
nsenter -t "$HOLDER" -m -r -w fsfreeze -f "$MNT" || fail "still frozen after the thaw"
nsenter -t "$HOLDER" -m -r -w fsfreeze -u "$MNT"
kill "$HOLDER"; wait "$HOLDER" 2>/dev/null || true; HOLDER=""
stop_serve

info "2: daemon in a namespace of its own, ext4 mounted in the initial one"
"$SNAPBLK" volume create "$WORK/vol2" --size 128M
unshare -m --propagation private "$SNAPBLK" serve "$WORK/vol2" --socket "$WORK/vol2.sock" >"$RESULTS/serve-2.out" 2>"$RESULTS/serve-2.log" &
SERVE_PID=$!
for _ in $(seq 600); do grep -q '^serving volume' "$RESULTS/serve-2.out" && break; sleep 0.1; done
DEV="$(sed -n 's|^serving volume .* as \(/dev/ublkb[0-9]*\)$|\1|p' "$RESULTS/serve-2.out")"
[ -n "$DEV" ] || fail "the daemon in its own namespace did not come up: $(tail -5 "$RESULTS/serve-2.log")"
mkfs.ext4 -q -F "$DEV"
mount -t ext4 "$DEV" "$MNT"
"$SNAPBLK" snapshot create s2 -V vol2 --socket "$WORK/vol2.sock" -o json >"$WORK/s2.json" ||
    fail "snapshot failed: $(cat "$WORK/s2.json")"
json '.consistency' <"$WORK/s2.json" | grep -q '^application-consistent' ||
    fail "not frozen from the daemon's own namespace: $(cat "$WORK/s2.json")"
json '.frozen_mounts[0]' <"$WORK/s2.json" | grep -q "^/proc/1/root/.*$MNT\$" ||
    fail "not frozen through PID 1's root: $(cat "$WORK/s2.json")"
umount "$MNT"
stop_serve

info "3: ext4 mounted in a namespace no process is in"
start_serve "$WORK/vol" serve-3 --socket "$SOCK"
mkdir -p "$NSDIR"
mount --bind "$NSDIR" "$NSDIR"
mount --make-private "$NSDIR"
touch "$NSDIR/mnt"
unshare --mount="$NSDIR/mnt" --propagation private mount -t ext4 "$DEV" "$MNT"
! grep -q " $MNT " /proc/self/mountinfo || fail "the mount leaked into the initial namespace"
if out=$("$SNAPBLK" snapshot create s3 -V vol --socket "$SOCK" 2>&1); then
    fail "--freeze auto took a snapshot of a device mounted out of sight: $out"
fi
for want in "is in use" "no mount of it is visible" "--freeze none"; do
    echo "$out" | grep -q -- "$want" || fail "the refusal does not say '$want': $out"
done
info "refused: $out"
"$SNAPBLK" snapshot create s3 -V vol --socket "$SOCK" --freeze none -o json >"$WORK/s3.json" ||
    fail "--freeze none was refused: $(cat "$WORK/s3.json")"
json '.consistency' <"$WORK/s3.json" | grep -q "crash-consistent (freeze none)" ||
    fail "unexpected: $(cat "$WORK/s3.json")"
# Dropping the namespace's last reference unmounts the file system.
umount "$NSDIR/mnt"
umount "$NSDIR"
# Unmounted everywhere: auto is crash-consistent again, without refusal.
ok=0
for _ in $(seq 50); do
    if "$SNAPBLK" snapshot create s4 -V vol --socket "$SOCK" -o json >"$WORK/s4.json" 2>&1; then
        ok=1
        break
    fi
    sleep 0.2
done
[ "$ok" = 1 ] || fail "a snapshot of an idle device was refused: $(cat "$WORK/s4.json")"
stop_serve
SERVE_PID=""
