#!/usr/bin/env bash
# The main job, on a machine whose kernel has ublk_drv (the host, or the test VM):
# create a volume, serve it as /dev/ublkbN, make a filesystem, mount it, write to it,
# show the device and volume status, take a snapshot (freezing the file system), stop
# cleanly, serve again and check the files.
set -euo pipefail
SNAPBLK="${SNAPBLK:?path of the snapblk binary}"
work="${WORK:-$(mktemp -d)}"
vol="$work/demo-volume"
mnt="$work/mnt"
log="$work/serve.log"
pid=""

cleanup() {
    mountpoint -q "$mnt" 2>/dev/null && umount "$mnt" || true
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" || true
    fi
}
trap cleanup EXIT

step() { printf '\n### %s\n' "$*"; }

# Kernel modules: from the test VM's module tree when there is one (MODTREE), else the host's.
load_module() {
    if [ -n "${MODTREE:-}" ]; then modprobe -d "$MODTREE" "$1"; else modprobe "$1"; fi
}
if [ ! -e /dev/ublk-control ]; then
    load_module ublk_drv || { echo "demo: cannot load ublk_drv" >&2; exit 1; }
    for _ in $(seq 50); do [ -e /dev/ublk-control ] && break; sleep 0.1; done
fi
grep -qw ext4 /proc/filesystems || load_module ext4 || { echo "demo: cannot load ext4" >&2; exit 1; }

step "create a 512 MiB volume"
"$SNAPBLK" volume create "$vol" --size 512M

step "serve it as a ublk block device"
"$SNAPBLK" serve "$vol" >"$log" 2>&1 &
pid=$!
dev=""
for _ in $(seq 1 100); do
    dev="$(grep -o '/dev/ublkb[0-9]*' "$log" | head -n 1 || true)"
    [ -n "$dev" ] && [ -b "$dev" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "demo: snapblk serve exited" >&2; exit 1; }
    sleep 0.2
done
[ -n "$dev" ] && [ -b "$dev" ] || { cat "$log"; echo "demo: no device appeared" >&2; exit 1; }
cat "$log"

step "make an ext4 filesystem on $dev and mount it"
mkfs.ext4 -q -F "$dev"
mkdir -p "$mnt"
mount "$dev" "$mnt"

step "write to it"
for i in $(seq 1 20); do
    head -c 1M /dev/urandom >"$mnt/file-$i"
done
sync
( cd "$mnt" && sha256sum file-* >"$work/sums" )
df -h "$mnt"

step "device status"
name="${dev#/dev/}"
echo "device $dev: $(cat "/sys/block/$name/size") sectors of 512 bytes," \
    "logical block $(cat "/sys/block/$name/queue/logical_block_size")," \
    "write cache: $(cat "/sys/block/$name/queue/write_cache" 2>/dev/null || echo n/a)"
grep -E "^ *[0-9]+ +[0-9]+ $name " /proc/diskstats | awk '{print "reads completed " $4 ", writes completed " $8}'

step "volume status from the daemon, and an application-consistent snapshot of the mounted file system"
"$SNAPBLK" status -V demo-volume
"$SNAPBLK" snapshot create live-1 -V demo-volume
"$SNAPBLK" snapshot list -V demo-volume

step "unmount and stop the daemon (SIGTERM flushes and removes the device)"
umount "$mnt"
kill -TERM "$pid"
wait "$pid"
pid=""
tail -n 3 "$log"
[ -e "$dev" ] && { echo "demo: $dev still exists after stop" >&2; exit 1; }

step "the volume folder, not served: status, another snapshot"
"$SNAPBLK" volume status "$vol"
"$SNAPBLK" snapshot create after-demo -V "$vol"
"$SNAPBLK" snapshot list -V "$vol"

step "serve again and check every file"
"$SNAPBLK" serve "$vol" >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    grep -q '/dev/ublkb' "$log" && [ -b "$dev" ] && break
    sleep 0.2
done
mount "$dev" "$mnt"
( cd "$mnt" && sha256sum -c --quiet "$work/sums" ) && echo "all 20 files intact after restart"
umount "$mnt"
echo
echo "demo: done"
