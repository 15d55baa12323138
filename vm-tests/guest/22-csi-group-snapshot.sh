#!/bin/bash
# CSI group snapshots on the real ublk driver: one consistency point across two volumes.
# - two volumes, ext4 and xfs, staged and published, each under writers whose records
#   reference the other volume's: writer 1 writes record N to the ext4 volume, then record
#   N to the xfs volume; writer 2 the other way round; each record is fsync'd and names the
#   last record of the same writer on the other volume. Snapshots cut at two different
#   moments break a reference (a record naming one the other snapshot does not have);
# - CreateVolumeGroupSnapshot three times while the writers run: both members frozen, then
#   cut, then thawed; the driver reports the window (printed);
# - every member restored (CreateVolume from its snapshot), staged and published: every
#   cross-reference of every group resolves in its restored pair;
# - retry by name, Get, and failures (a member that does not exist, a window that cannot
#   fit its deadline): an error, no snapshot left, nothing left frozen; Delete.
# timeout: 1500
# kernels: 7
set -euo pipefail
. "$GUEST_LIB"

need_cmd mkfs.ext4 mkfs.xfs findmnt timeout
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"
modprobe_mod xfs || fail "cannot load xfs"

WRITERS=""
# Runs at every exit: it must not change the exit status (with errexit and pipefail, a
# grep that finds no mount left would turn a pass into exit status 1).
cleanup() {
    set +e
    for p in $WRITERS; do kill "$p" 2>/dev/null; done
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | while read -r m; do
        fsfreeze -u "$m" 2>/dev/null
        umount "$m" 2>/dev/null
    done
    [ -n "${CSI_PID:-}" ] && kill "$CSI_PID" 2>/dev/null || true
    pkill -TERM -f "$SNAPBLK serve" 2>/dev/null || true
}
trap cleanup EXIT

FIG="$RESULTS/csi-group-figures.txt"
: >"$FIG"
figure() { echo "$*" | tee -a "$FIG"; }
median_max() { sort -n | awk '{a[NR]=$1} END {printf "median %d, max %d (%d groups)", a[int((NR+1)/2)], a[NR], NR}'; }

stage_publish() {
    local vol="$1" dir="$2"
    shift 2
    mkdir -p "$dir/staging" "$dir/pod"
    csi stage --volume "$vol" --staging "$dir/staging" "$@"
    csi publish --volume "$vol" --staging "$dir/staging" --target "$dir/pod/mount" "$@"
}

unpublish_unstage() {
    local vol="$1" dir="$2"
    csi unpublish --volume "$vol" --target "$dir/pod/mount"
    csi unstage --volume "$vol" --staging "$dir/staging"
    ! mountpoint -q "$dir/staging" || fail "NodeUnstage left $dir/staging mounted"
}

# writer FIRST SECOND TAG: record N goes to FIRST/TAG/N (naming N-1, the last record
# written to SECOND), fsync'd, then to SECOND/TAG/N (naming N), fsync'd.
writer() {
    local first="$1/$3" second="$2/$3" n=0
    mkdir -p "$first" "$second"
    sync "$first" "$second"
    while :; do
        n=$((n + 1))
        echo "$((n - 1))" >"$first/$n"
        sync "$first/$n"
        echo "$n" >"$second/$n"
        sync "$second/$n"
    done
}

# check_pair A B: every record of either volume names a record the other one holds
# (0: none yet). An empty record was being written at the cut: it does not count. Sets
# RECORDS to the number of records checked.
check_pair() {
    local a="$1" b="$2" tag dir other f ref
    RECORDS=0
    for tag in w1 w2; do
        for dir in "$a" "$b"; do
            if [ "$dir" = "$a" ]; then other="$b"; else other="$a"; fi
            [ -d "$dir/$tag" ] || fail "$dir/$tag is missing"
            for f in "$dir/$tag"/*; do
                [ -s "$f" ] || continue
                RECORDS=$((RECORDS + 1))
                ref=$(cat "$f")
                [ "$ref" = 0 ] && continue
                [ -s "$other/$tag/$ref" ] ||
                    fail "record $f names record $ref of $other/$tag, which the restored pair lacks (last there: $(ls "$other/$tag" | sort -n | tail -1)): the two snapshots are not of one point"
            done
        done
    done
}

# member_of VOLUME: the member snapshot of VOLUME in the last group answer.
member_of() {
    awk -v v="$1" '/^snapshot_id=/ {s = substr($0, 13)} /^source_volume_id=/ {if (substr($0, 18) == v) print s}' "$CSI_OUT"
}

start_csi driver
csi create-volume --name pvc-data --size $((256 << 20)) --node "$CSI_NODE" --fs ext4
VOL_A=$(kv volume_id)
csi create-volume --name pvc-wal --size $((320 << 20)) --node "$CSI_NODE" --fs xfs
VOL_B=$(kv volume_id)
stage_publish "$VOL_A" "$WORK/a" --fs ext4
stage_publish "$VOL_B" "$WORK/b" --fs xfs
MA="$WORK/a/pod/mount"
MB="$WORK/b/pod/mount"

info "writers: records on each volume name the other's"
writer "$MA" "$MB" w1 &
WRITERS="$!"
writer "$MB" "$MA" w2 &
WRITERS="$WRITERS $!"
sleep 2

: >"$WORK/window-us"
: >"$WORK/frozen-us"
: >"$WORK/call-ms"
declare -a G_ID G_A G_B
for n in 1 2 3; do
    name="groupsnapshot-0f3c6a52-0000-4000-8000-00000000000$n"
    before=$(ls "$MA/w1" | wc -l)
    csi create-group-snapshot --name "$name" --volume "$VOL_A" --volume "$VOL_B"
    [ "$(kv members)" = 2 ] || fail "group $n: $(cat "$CSI_OUT")"
    [ "$(kv group_ready_to_use)" = true ] || fail "group $n not ready: $(cat "$CSI_OUT")"
    gid=$(kv group_snapshot_id)
    sa=$(member_of "$VOL_A")
    sb=$(member_of "$VOL_B")
    [ -n "$sa" ] && [ -n "$sb" ] || fail "group $n: members: $(cat "$CSI_OUT")"
    [ "$(grep -c "^group_snapshot_id=$gid\$" "$CSI_OUT")" = 3 ] || fail "members do not name their group: $(cat "$CSI_OUT")"
    kv freeze_window_us >>"$WORK/window-us"
    kv frozen_max_us >>"$WORK/frozen-us"
    kv elapsed_ms >>"$WORK/call-ms"
    figure "group $n: window $(kv freeze_window_us) us (first freeze asked to last thaw answered), longest frozen $(kv frozen_max_us) us, call $(kv elapsed_ms) ms"
    G_ID[n]="$gid"
    G_A[n]="$sa"
    G_B[n]="$sb"
    # The writers carry on after the thaw.
    for _ in $(seq 100); do [ "$(ls "$MA/w1" | wc -l)" -gt "$before" ] && break; sleep 0.1; done
    [ "$(ls "$MA/w1" | wc -l)" -gt "$before" ] || fail "the writers did not move after group $n"
    sleep 1
done
for p in $WRITERS; do kill "$p"; done
for p in $WRITERS; do wait "$p" 2>/dev/null || true; done
WRITERS=""
figure "group snapshot window, us: $(median_max <"$WORK/window-us")"
figure "longest frozen file system, us: $(median_max <"$WORK/frozen-us")"
figure "CreateVolumeGroupSnapshot, ms: $(median_max <"$WORK/call-ms")"
apps=$(grep -c 'group snapshot member.*consistency="application"' "$RESULTS/driver.log" || true)
[ "$apps" -ge 6 ] || fail "$apps of 6 group members were frozen: $(grep 'group snapshot member' "$RESULTS/driver.log" | tail -6)"
grep -q 'group snapshot taken.*window_us=' "$RESULTS/driver.log" || fail "the driver does not log the window"

info "restore every group: every cross-reference resolves"
for n in 1 2 3; do
    csi create-volume --name "pvc-data-r$n" --size $((256 << 20)) --node "$CSI_NODE" --fs ext4 --from-snapshot "${G_A[n]}"
    RA=$(kv volume_id)
    csi create-volume --name "pvc-wal-r$n" --size $((320 << 20)) --node "$CSI_NODE" --fs xfs --from-snapshot "${G_B[n]}"
    RB=$(kv volume_id)
    stage_publish "$RA" "$WORK/ra$n" --fs ext4
    stage_publish "$RB" "$WORK/rb$n" --fs xfs
    check_pair "$WORK/ra$n/pod/mount" "$WORK/rb$n/pod/mount"
    [ "$RECORDS" -gt 4 ] || fail "group $n holds only $RECORDS records"
    info "group $n: $RECORDS records, every reference resolves"
    unpublish_unstage "$RA" "$WORK/ra$n"
    unpublish_unstage "$RB" "$WORK/rb$n"
    csi delete-volume --volume "$RA"
    csi delete-volume --volume "$RB"
done

info "retry by name, Get"
gid="${G_ID[1]}" sa="${G_A[1]}" sb="${G_B[1]}"
csi create-group-snapshot --name "groupsnapshot-0f3c6a52-0000-4000-8000-000000000001" --volume "$VOL_B" --volume "$VOL_A"
[ "$(kv group_snapshot_id)" = "$gid" ] && [ "$(member_of "$VOL_A")" = "$sa" ] && [ "$(member_of "$VOL_B")" = "$sb" ] ||
    fail "the retry gave another group: $(cat "$CSI_OUT")"
csi get-group-snapshot --group "$gid" --snapshot "$sa" --snapshot "$sb"
[ "$(kv members)" = 2 ] || fail "get: $(cat "$CSI_OUT")"
csi list-snapshots --volume "$VOL_A"
count_a=$(kv count)
[ "$count_a" = 3 ] || fail "volume A has $count_a snapshots, not 3"

# not_frozen DIR: a write to DIR completes at once.
not_frozen() {
    timeout 5 sh -c "echo x >'$1/probe' && sync '$1/probe'" || fail "$1 is still frozen"
}

info "failures leave nothing behind and nothing frozen"
csi_expect_error NotFound create-group-snapshot --name groupsnapshot-missing --volume "$VOL_A" --volume "$CSI_NODE/00000000deadbeef"
not_frozen "$MA"
not_frozen "$MB"
csi_expect_error DeadlineExceeded create-group-snapshot --name groupsnapshot-tight --volume "$VOL_A" --volume "$VOL_B" --param freezeTimeout=1ms
not_frozen "$MA"
not_frozen "$MB"
for v in "$VOL_A" "$VOL_B"; do
    csi list-snapshots --volume "$v"
    [ "$(kv count)" = 3 ] || fail "a failed group left a snapshot of $v: $(cat "$CSI_OUT")"
done

info "delete the groups"
for n in 1 2 3; do
    csi delete-group-snapshot --group "${G_ID[n]}" --snapshot "${G_A[n]}" --snapshot "${G_B[n]}"
    csi delete-group-snapshot --group "${G_ID[n]}" --snapshot "${G_A[n]}" --snapshot "${G_B[n]}"
done
for v in "$VOL_A" "$VOL_B"; do
    csi list-snapshots --volume "$v"
    [ "$(kv count)" = 0 ] || fail "snapshots of $v left after the groups were deleted: $(cat "$CSI_OUT")"
done

unpublish_unstage "$VOL_A" "$WORK/a"
unpublish_unstage "$VOL_B" "$WORK/b"
csi delete-volume --volume "$VOL_A"
csi delete-volume --volume "$VOL_B"
ls /dev/ublkb* >/dev/null 2>&1 && fail "devices left: $(ls /dev/ublkb*)"
[ -z "$(ls -A "$CSI_STATE/volumes")" ] || fail "volume folders left: $(ls -A "$CSI_STATE/volumes")"
kill "$CSI_PID"
wait "$CSI_PID" || true
CSI_PID=""
info "figures: $(tr '\n' ';' <"$FIG")"
