#!/bin/bash
# The CSI driver as Kubernetes drives it, on the real ublk driver, through its socket
# (snapblk csi all-in-one, calls sent with the sidecars' and the kubelet's fields):
# - ext4 and xfs: CreateVolume, NodeStage (the file system is made once; a second stage
#   is a no-op), NodePublish; checksummed files; CreateSnapshot five times while a
#   database-like writer (small files, fsync each) runs: each is application-consistent
#   (the file system was frozen for the cut); more writes; CreateVolume from the snapshot,
#   staged and published: exactly the files of before the snapshot, none of after;
# - a block volume: stage and publish the raw device onto a file, write and read back;
# - online expansion: ControllerExpandVolume + NodeExpandVolume grow the mounted ext4 on
#   a kernel whose driver can resize a live device; on an older one the controller says
#   so (FailedPrecondition) and nothing changes;
# - the source volume deleted while its snapshot stays: the snapshot is still listed and
#   restores; deleting the last snapshot removes the volume's folder;
# - at the end no device, daemon, mount or volume folder is left.
# Prints stage, publish, snapshot (median, max, with the freeze window) and restore
# latencies, also in $RESULTS/csi-figures.txt.
# timeout: 1500
# kernels: 7
set -euo pipefail
. "$GUEST_LIB"

need_cmd mkfs.ext4 mkfs.xfs resize2fs blkid blockdev sha256sum findmnt
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"
modprobe_mod xfs || fail "cannot load xfs"

WRITER_PID=""
cleanup() {
    [ -n "$WRITER_PID" ] && kill "$WRITER_PID" 2>/dev/null || true
    { grep -o " $WORK/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount "$m" 2>/dev/null || true; done
    [ -n "${CSI_PID:-}" ] && kill "$CSI_PID" 2>/dev/null || true
    pkill -TERM -f "$SNAPBLK serve" 2>/dev/null || true
}
trap cleanup EXIT

FIG="$RESULTS/csi-figures.txt"
: >"$FIG"
figure() { echo "$*" | tee -a "$FIG"; }
median_max() { sort -n | awk '{a[NR]=$1} END {printf "median %d ms, max %d ms (%d calls)", a[int((NR+1)/2)], a[NR], NR}'; }
key_of() { echo "${1#*/}"; }

start_csi driver
csi node-info
[ "$(kv node_id)" = "$CSI_NODE" ] || fail "NodeGetInfo: $(cat "$CSI_OUT")"

# stage_publish VOLUME DIR ACCESS...: NodeStage at DIR/staging, NodePublish at
# DIR/pod/mount (the kubelet makes the staging folder and the publish target's parent).
stage_publish() {
    local vol="$1" dir="$2"
    shift 2
    mkdir -p "$dir/staging" "$dir/pod"
    csi stage --volume "$vol" --staging "$dir/staging" "$@"
    STAGE_MS=$(kv elapsed_ms)
    csi stage --volume "$vol" --staging "$dir/staging" "$@"
    csi publish --volume "$vol" --staging "$dir/staging" --target "$dir/pod/mount" "$@"
    PUBLISH_MS=$(kv elapsed_ms)
    csi publish --volume "$vol" --staging "$dir/staging" --target "$dir/pod/mount" "$@"
}

unpublish_unstage() {
    local vol="$1" dir="$2"
    csi unpublish --volume "$vol" --target "$dir/pod/mount"
    [ ! -e "$dir/pod/mount" ] || fail "NodeUnpublish left $dir/pod/mount"
    csi unpublish --volume "$vol" --target "$dir/pod/mount"
    csi unstage --volume "$vol" --staging "$dir/staging"
    csi unstage --volume "$vol" --staging "$dir/staging"
    ! mountpoint -q "$dir/staging" || fail "NodeUnstage left $dir/staging mounted"
}

# database_writer DIR: many small records, each made durable with fsync.
database_writer() {
    local i=0
    while :; do
        i=$((i + 1))
        head -c 16K /dev/urandom >"$1/rec-$((i % 64))"
        sync "$1/rec-$((i % 64))" 2>/dev/null || sync
    done
}

: >"$WORK/snap-ms"
for fs in ext4 xfs; do
    info "$fs: create, stage, publish"
    csi create-volume --name "pvc-$fs-0001" --size $((256 << 20)) --node "$CSI_NODE" --fs "$fs"
    VOL=$(kv volume_id)
    [ "$(kv topology)" = "topology.csi.snapblk.io/node=$CSI_NODE" ] || fail "topology: $(cat "$CSI_OUT")"
    stage_publish "$VOL" "$WORK/$fs" --fs "$fs"
    figure "NodeStageVolume $fs (mkfs included): $STAGE_MS ms; NodePublishVolume: $PUBLISH_MS ms"
    MNT="$WORK/$fs/pod/mount"
    [ "$(findmnt -n -o FSTYPE --target "$MNT")" = "$fs" ] || fail "$MNT is not $fs: $(findmnt --target "$MNT")"
    dev=$(findmnt -n -o SOURCE "$WORK/$fs/staging")
    case "$dev" in /dev/ublkb*) ;; *) fail "staging is mounted from $dev, not a ublk device" ;; esac
    mkdir "$MNT/db"
    for i in $(seq 1 12); do head -c 256K /dev/urandom >"$MNT/before-$i"; done
    sync
    (cd "$MNT" && sha256sum before-*) >"$WORK/$fs-sums"

    info "$fs: snapshots under a database-like writer"
    database_writer "$MNT/db" &
    WRITER_PID=$!
    sleep 1
    for n in 1 2 3 4 5; do
        csi create-snapshot --volume "$VOL" --name "snapshot-$fs-$n"
        [ "$(kv ready_to_use)" = true ] || fail "snapshot not ready: $(cat "$CSI_OUT")"
        [ "$(kv source_volume_id)" = "$VOL" ] || fail "snapshot source: $(cat "$CSI_OUT")"
        kv elapsed_ms >>"$WORK/snap-ms"
        eval "SNAP_$n=$(kv snapshot_id)"
        sleep 0.5
    done
    kill "$WRITER_PID"
    wait "$WRITER_PID" 2>/dev/null || true
    WRITER_PID=""
    # The snapshotter repeats CreateSnapshot until ready: same snapshot.
    csi create-snapshot --volume "$VOL" --name "snapshot-$fs-5"
    [ "$(kv snapshot_id)" = "$SNAP_5" ] || fail "CreateSnapshot retry gave $(kv snapshot_id), not $SNAP_5"
    apps=$(grep -c "took snapshot.*volume=$(key_of "$VOL") .*consistency=\"application\"" "$RESULTS/driver.log" || true)
    [ "$apps" -ge 5 ] || fail "$fs: $apps of 5 snapshots froze the file system: $(grep 'took snapshot' "$RESULTS/driver.log" | tail -5)"

    info "$fs: writes after the snapshot"
    for i in $(seq 1 4); do head -c 256K /dev/urandom >"$MNT/after-$i"; done
    head -c 256K /dev/urandom >"$MNT/before-1"
    sync

    info "$fs: restore from the snapshot"
    csi create-volume --name "pvc-$fs-restored" --size $((256 << 20)) --node "$CSI_NODE" --fs "$fs" --from-snapshot "$SNAP_5"
    RESTORED=$(kv volume_id)
    figure "CreateVolume from a snapshot ($fs, 256 MiB): $(kv elapsed_ms) ms"
    stage_publish "$RESTORED" "$WORK/$fs-restored" --fs "$fs"
    figure "NodeStageVolume of the restore ($fs, file system found, no mkfs): $STAGE_MS ms; NodePublishVolume: $PUBLISH_MS ms"
    RMNT="$WORK/$fs-restored/pod/mount"
    (cd "$RMNT" && sha256sum -c --quiet "$WORK/$fs-sums") || fail "$fs: the restore does not hold the files of before the snapshot"
    ! ls "$RMNT"/after-* >/dev/null 2>&1 || fail "$fs: the restore holds files written after the snapshot"
    [ "$(findmnt -n -o SOURCE "$WORK/$fs-restored/staging")" != "$dev" ] || fail "the restore is served by the source's device"
    csi stats --volume "$RESTORED" --path "$RMNT"
    [ "$(kv abnormal)" = false ] || fail "stats: $(cat "$CSI_OUT")"
    [ "$(kv bytes_total)" -gt $((200 << 20)) ] || fail "stats: $(cat "$CSI_OUT")"
    [ "$(kv inodes_total)" -gt 0 ] || fail "stats: $(cat "$CSI_OUT")"
    unpublish_unstage "$RESTORED" "$WORK/$fs-restored"
    csi delete-volume --volume "$RESTORED"
    eval "VOL_$fs=$VOL"
    eval "SNAPS_$fs=\"$SNAP_1 $SNAP_2 $SNAP_3 $SNAP_4 $SNAP_5\""
done
figure "CreateSnapshot under a writer (ext4 and xfs): $(median_max <"$WORK/snap-ms")"
# Writers stall from the start of FIFREEZE (which first flushes the file system) to the thaw.
sed -n 's/.*took snapshot.*freeze_us=\([0-9]*\) frozen_us=\([0-9]*\).*/\1 \2/p' "$RESULTS/driver.log" >"$WORK/freeze-us"
[ "$(wc -l <"$WORK/freeze-us")" -ge 10 ] || fail "no freeze figures in the driver log"
awk '{print int(($1 + $2) / 1000)}' "$WORK/freeze-us" >"$WORK/stall-ms"
awk '{print int($2 / 1000)}' "$WORK/freeze-us" >"$WORK/frozen-ms"
figure "  writers stalled within it (FIFREEZE to thaw): $(median_max <"$WORK/stall-ms"); frozen for the cut: $(median_max <"$WORK/frozen-ms")"

info "block volume"
csi create-volume --name pvc-block-0001 --size $((64 << 20)) --node "$CSI_NODE" --block
BVOL=$(kv volume_id)
mkdir -p "$WORK/blk/staging" "$WORK/blk/pod"
csi stage --volume "$BVOL" --staging "$WORK/blk/staging" --block
csi publish --volume "$BVOL" --staging "$WORK/blk/staging" --target "$WORK/blk/pod/dev" --block
csi publish --volume "$BVOL" --staging "$WORK/blk/staging" --target "$WORK/blk/pod/dev" --block
[ "$(blockdev --getsize64 "$WORK/blk/pod/dev")" = $((64 << 20)) ] || fail "the published block device is not 64 MiB"
head -c 4M /dev/urandom >"$WORK/blk.data"
dd if="$WORK/blk.data" of="$WORK/blk/pod/dev" bs=1M seek=7 oflag=direct conv=fsync status=none
dd if="$WORK/blk/pod/dev" of="$WORK/blk.back" bs=1M skip=7 count=4 iflag=direct,fullblock status=none
cmp "$WORK/blk.back" "$WORK/blk.data" || fail "the block volume does not read back what was written"
csi stats --volume "$BVOL" --path "$WORK/blk/pod/dev"
[ "$(kv bytes_total)" = $((64 << 20)) ] || fail "block stats: $(cat "$CSI_OUT")"
csi unpublish --volume "$BVOL" --target "$WORK/blk/pod/dev"
[ ! -e "$WORK/blk/pod/dev" ] || fail "NodeUnpublish left the block target file"
csi unstage --volume "$BVOL" --staging "$WORK/blk/staging"
csi delete-volume --volume "$BVOL"

info "online expansion of the published ext4 volume"
VOL="$VOL_ext4"
MNT="$WORK/ext4/pod/mount"
log="$CSI_STATE/logs/$(key_of "$VOL").log"
features=$(grep -o 'features=0x[0-9a-f]*' "$log" | head -n 1 | cut -d= -f2)
[ -n "$features" ] || fail "no driver features in $log"
before=$(df -B1 --output=size "$MNT" | tail -n 1 | tr -d ' ')
if ((features & 1024)); then # UBLK_F_UPDATE_SIZE
    csi expand --volume "$VOL" --size $((512 << 20)) --fs ext4
    [ "$(kv capacity_bytes)" = $((512 << 20)) ] || fail "expand: $(cat "$CSI_OUT")"
    [ "$(kv node_expansion_required)" = true ] || fail "expand: $(cat "$CSI_OUT")"
    csi node-expand --volume "$VOL" --path "$MNT" --staging "$WORK/ext4/staging" --size $((512 << 20)) --fs ext4
    after=$(df -B1 --output=size "$MNT" | tail -n 1 | tr -d ' ')
    info "ext4: $before -> $after bytes"
    [ "$after" -gt $((before + 200 * 1024 * 1024)) ] || fail "df shows $after bytes after expansion (was $before)"
    head -c 300M /dev/zero >"$MNT/big" || fail "the grown file system does not take 300 MiB"
    rm "$MNT/big"
else
    csi_expect_error FailedPrecondition expand --volume "$VOL" --size $((512 << 20)) --fs ext4
    grep -q "6.16" "$CSI_OUT.err" || fail "the refusal does not say what is needed: $(cat "$CSI_OUT.err")"
    [ "$(df -B1 --output=size "$MNT" | tail -n 1 | tr -d ' ')" = "$before" ] || fail "the file system changed"
fi
grep -v ' before-1$' "$WORK/ext4-sums" >"$WORK/ext4-sums-unchanged"
(cd "$MNT" && sha256sum -c --quiet "$WORK/ext4-sums-unchanged") || fail "files changed by the expansion"

info "delete the source volumes; their snapshots stay and restore"
for fs in ext4 xfs; do
    eval "VOL=\$VOL_$fs SNAPS=\$SNAPS_$fs"
    unpublish_unstage "$VOL" "$WORK/$fs"
    csi delete-volume --volume "$VOL"
    csi delete-volume --volume "$VOL"
    set -- $SNAPS
    csi list-snapshots --snapshot "$5"
    [ "$(kv count)" = 1 ] || fail "snapshot $5 is gone with its volume: $(cat "$CSI_OUT")"
    csi create-volume --name "pvc-$fs-late" --size $((256 << 20)) --node "$CSI_NODE" --fs "$fs" --from-snapshot "$5"
    LATE=$(kv volume_id)
    stage_publish "$LATE" "$WORK/$fs-late" --fs "$fs"
    (cd "$WORK/$fs-late/pod/mount" && sha256sum -c --quiet "$WORK/$fs-sums") || fail "$fs: restore after delete differs"
    unpublish_unstage "$LATE" "$WORK/$fs-late"
    csi delete-volume --volume "$LATE"
    folder="$CSI_STATE/volumes/$(key_of "$VOL")"
    [ -d "$folder" ] || fail "the deleted volume's folder went while snapshots need it"
    for s in $SNAPS; do csi delete-snapshot --snapshot "$s"; done
    [ ! -e "$folder" ] || fail "the deleted volume's folder stayed after its last snapshot"
done

info "nothing left behind"
ls /dev/ublkb* >/dev/null 2>&1 && fail "devices left: $(ls /dev/ublkb*)"
pgrep -f "$SNAPBLK serve" >/dev/null && fail "daemons left: $(pgrep -af "$SNAPBLK serve")"
grep -q " $WORK/" /proc/mounts && fail "mounts left: $(grep " $WORK/" /proc/mounts)"
[ -z "$(ls -A "$CSI_STATE/volumes")" ] || fail "volume folders left: $(ls -A "$CSI_STATE/volumes")"
[ -z "$(ls -A "$CSI_STATE/run")" ] || fail "daemon records left: $(ls -A "$CSI_STATE/run")"
kill "$CSI_PID"
wait "$CSI_PID" || true
CSI_PID=""
info "figures: $(tr '\n' ';' <"$FIG")"
