#!/bin/bash
# A node plugin restart does not break mounted volumes. A volume is created, staged (ext4)
# and published through the CSI all-in-one driver, and fio writes and verifies a file in
# the pod's mount while:
#   1. the plugin is killed (-9): the volume daemon keeps serving (the mount takes writes
#      with no plugin at all), the restarted plugin adopts the same daemon, and fio
#      completes with no verify error;
#   2. the plugin and the volume daemon are both killed (-9): the restarted plugin takes
#      the device over (`serve --recover`, same /dev/ublkbN), and fio completes with no
#      verify error;
#   3. the plugin is stopped (SIGTERM, an upgrade) and started again: it adopts the daemon,
#      and Unpublish and Unstage stop that daemon (not a child of this plugin).
# The kubelet's retries (Stage, Publish, Unpublish, Unstage twice) succeed before and after
# restarts; the volume, served directly after Unstage, passes e2fsck, and staged again holds
# the file fio wrote, byte for byte. At the end nothing is left: no device, no daemon, no
# mount, no daemon record.
# timeout: 900
set -euo pipefail
. "$GUEST_LIB"

need_cmd fio e2fsck sha256sum pgrep python3 ip
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"
# The guest leaves loopback down; a driver may talk to itself over it (the all-in-one's
# controller to its node agent).
ip link set lo up || fail "cannot bring up the loopback interface"

STAGING="$WORK/staging"
TARGET="$WORK/pod/mount"
FIGURES="$RESULTS/figures.txt"
VOL_ID=""
KEY=""
DEV=""
fio_pid=""
CSI_PID=""

plugin_up() { [ -n "$CSI_PID" ] && kill -0 "$CSI_PID" 2>/dev/null; }

# On failure, bring the volume down through the driver: first make sure a daemon serves
# the device again (a plugin started here recovers a dead one; else recover it here), so
# that fio can end and no unmount waits on a device without a server. The runner does
# the rest.
cleanup() {
    local rc=$?
    trap - EXIT
    set +e
    if [ "$rc" != 0 ] && [ -n "$VOL_ID" ]; then
        if plugin_up && [ -e "/dev/ublkc${DEV#/dev/ublkb}" ] &&
            [ -z "$(pgrep -f "serve .*$KEY")" ]; then
            setsid "$SNAPBLK" serve "$CSI_STATE/volumes/$KEY" --socket "$CSI_STATE/sockets/$KEY.sock" \
                --recover --id "${DEV#/dev/ublkb}" >>"$RESULTS/serve-cleanup.log" 2>&1 </dev/null &
            sleep 5
        fi
        if ! plugin_up; then
            "$SNAPBLK" csi all-in-one --endpoint "unix://$CSI_SOCK" --node-id "$CSI_NODE" \
                --state-dir "$CSI_STATE" >>"$RESULTS/csi-cleanup.log" 2>&1 &
            CSI_PID=$!
            for _ in $(seq 300); do
                "$BIN_DIR/csi-call" --endpoint "unix://$CSI_SOCK" probe >/dev/null 2>&1 && break
                sleep 0.2
            done
        fi
    fi
    if [ -n "$fio_pid" ]; then
        kill -9 "$fio_pid" 2>/dev/null
        for _ in $(seq 120); do kill -0 "$fio_pid" 2>/dev/null || break; sleep 0.5; done
        wait "$fio_pid" 2>/dev/null
    fi
    if [ "$rc" != 0 ] && [ -n "$VOL_ID" ]; then
        # (The mount stays busy for a moment after fio exits: io_uring lets go of its
        # files asynchronously.)
        for call in "unpublish --target $TARGET" "unstage --staging $STAGING"; do
            for _ in $(seq 10); do
                # shellcheck disable=SC2086
                timeout 120 "$BIN_DIR/csi-call" --endpoint "unix://$CSI_SOCK" $call --volume "$VOL_ID" \
                    >>"$RESULTS/cleanup-calls.txt" 2>&1 && break
                sleep 1
            done
        done
        # A daemon the plugin does not know of (lost record): stop it too.
        for pid in $(pgrep -f "serve .*$KEY"); do kill -TERM "$pid"; done
        for _ in $(seq 60); do [ -n "$(pgrep -f "serve .*$KEY")" ] || break; sleep 0.5; done
    fi
    if [ -n "$CSI_PID" ]; then
        kill -TERM "$CSI_PID" 2>/dev/null
        wait "$CSI_PID" 2>/dev/null
    fi
    exit "$rc"
}
trap cleanup EXIT

# figure TEXT: a figure, in the output and in $FIGURES.
figure() {
    info "$*"
    echo "$*" >>"$FIGURES"
}

# running PID: the process exists and is not a zombie.
running() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# record_field NAME: a field of the volume daemon's record (<state>/run/<key>.json).
record_field() {
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" \
        "$CSI_STATE/run/$KEY.json" "$1"
}

# restart_plugin NAME: starts the driver (log $RESULTS/NAME.log) and records how long it
# took until Probe answered.
restart_plugin() {
    local name="$1" t0 ms
    t0=$(date +%s%N)
    start_csi "$name"
    ms=$((($(date +%s%N) - t0) / 1000000))
    figure "$name: plugin answered Probe ${ms} ms after it was started"
}

# kill_plugin: kill -9 the driver and reap it.
kill_plugin() {
    kill -9 "$CSI_PID"
    wait "$CSI_PID" 2>/dev/null || true
    running "$CSI_PID" && fail "the plugin $CSI_PID survived kill -9"
    CSI_PID=""
}

stage() { csi stage --volume "$VOL_ID" --staging "$STAGING" --fs ext4; }
publish() { csi publish --volume "$VOL_ID" --staging "$STAGING" --target "$TARGET" --fs ext4; }

# check_mounts WHEN: the staging path and the target both show the volume's device.
check_mounts() {
    local dev
    dev="$(record_field device)"
    grep -q "^$dev $STAGING ext4 " /proc/self/mounts || fail "$1: $dev is not mounted at $STAGING"
    grep -q "^$dev $TARGET ext4 " /proc/self/mounts || fail "$1: $dev is not mounted at $TARGET"
}

# retry_calls WHEN: the kubelet's retries of Stage and Publish succeed and change nothing.
retry_calls() {
    local mounts_before
    mounts_before="$(grep -c " $WORK/" /proc/self/mounts)"
    stage
    publish
    [ "$(grep -c " $WORK/" /proc/self/mounts)" = "$mounts_before" ] ||
        fail "$1: retried Stage/Publish changed the mounts: $(grep " $WORK/" /proc/self/mounts)"
    check_mounts "$1"
}

# check_stats WHEN: NodeGetVolumeStats on the target reports a healthy volume.
check_stats() {
    csi stats --volume "$VOL_ID" --path "$TARGET"
    [ "$(kv abnormal)" = false ] || fail "$1: volume reported abnormal: $(kv condition)"
    [ "$(kv condition)" = "served as $DEV" ] || fail "$1: unexpected condition: $(kv condition)"
    [ "$(kv bytes_total)" -gt $((200 * 1024 * 1024)) ] || fail "$1: bytes_total $(kv bytes_total)"
}

# start_fio ROUND: fio writes (rate limited, ~25 s) then verifies a 48 MiB file in the
# pod's mount, in the background; sets fio_pid.
start_fio() {
    local round="$1"
    rm -f "$TARGET"/plugin-restart.*
    fio --name=plugin-restart --directory="$TARGET" --size=48M --ioengine=io_uring --direct=1 \
        --rw=randwrite --bs=4k --iodepth=16 --rate_iops=,500 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 \
        >"$RESULTS/fio-$round.txt" 2>&1 &
    fio_pid=$!
    FIO_T0=$(date +%s%N)
    # Let fio get well into its writes.
    sleep 4
    kill -0 "$fio_pid" 2>/dev/null || fail "round $round: fio ended early: $(tail -5 "$RESULTS/fio-$round.txt")"
}

# wait_fio ROUND: fio must exit 0 with no error and no verify failure.
wait_fio() {
    local round="$1" rc=0 secs errs deadline
    # Normally about 30 s; a device nobody serves any more holds fio forever.
    deadline=$(($(date +%s) + 240))
    while kill -0 "$fio_pid" 2>/dev/null; do
        [ "$(date +%s)" -lt "$deadline" ] ||
            fail "round $round: fio still runs 240 s after it started: $(tail -3 "$RESULTS/fio-$round.txt")"
        sleep 1
    done
    wait "$fio_pid" || rc=$?
    fio_pid=""
    secs=$((($(date +%s%N) - FIO_T0) / 1000000000))
    if [ "$rc" != 0 ] || grep -Eq 'err= *[1-9]|verify: bad|verify failed|bad magic|crc32c: verify' "$RESULTS/fio-$round.txt"; then
        tail -30 "$RESULTS/fio-$round.txt" >&2
        dmesg | tail -30 >&2
        fail "round $round: fio failed across the plugin restart (status $rc)"
    fi
    grep -q '^ *read:' "$RESULTS/fio-$round.txt" || fail "round $round: fio did no verification reads"
    errs="$(grep -o 'err= *[0-9]*' "$RESULTS/fio-$round.txt" | tr -d ' ' | sort -u | tr '\n' ' ')"
    figure "round $round: fio exit 0 in ${secs} s, ${errs}verify errors 0;" \
        "$(grep -E '^ *write:' "$RESULTS/fio-$round.txt" | sed 's/^ *//; s/,.*//');" \
        "longest write: $(awk '/^ *write:/ {w = 1} w && /^ *clat \(/ {sub(/^max=/, "", $4); print $4, $2; exit}' "$RESULTS/fio-$round.txt" | tr -d ',():')"
}

info "create, stage, publish (each twice, as the kubelet retries)"
start_csi csi-1
csi create-volume --name pvc-restart --size $((256 * 1024 * 1024)) --node "$CSI_NODE" --fs ext4
VOL_ID="$(kv volume_id)"
KEY="${VOL_ID#"$CSI_NODE"/}"
[ -n "$KEY" ] && [ "$KEY" != "$VOL_ID" ] || fail "unexpected volume id: $VOL_ID"
mkdir -p "$STAGING" "$(dirname "$TARGET")"
stage
DEV="$(record_field device)"
[ -b "$DEV" ] || fail "staged, but $DEV is not a block device"
publish
check_mounts "after the first Stage/Publish"
retry_calls "first retries"
DAEMON_PID="$(record_field pid)"
running "$DAEMON_PID" || fail "the recorded daemon pid $DAEMON_PID does not run"
grep -qa "$KEY" "/proc/$DAEMON_PID/cmdline" || fail "pid $DAEMON_PID is not the daemon of $KEY"
info "volume $VOL_ID served as $DEV by daemon $DAEMON_PID"

info "round 1: kill -9 the plugin while fio runs"
start_fio 1
kill_plugin
sleep 1
running "$DAEMON_PID" || fail "the volume daemon $DAEMON_PID died with the plugin"
[ "$(pgrep -f "serve .*$KEY")" = "$DAEMON_PID" ] || fail "daemons of $KEY: $(pgrep -af "serve .*$KEY")"
timeout 20 stat "$TARGET" >/dev/null || fail "stat of the mount failed with no plugin"
timeout 20 dd if=/dev/urandom of="$TARGET/no-plugin" bs=4k count=4 oflag=direct,sync status=none ||
    fail "no direct synchronous write through the mount with no plugin running"
kill -0 "$fio_pid" 2>/dev/null || fail "round 1: fio ended while no plugin ran: $(tail -5 "$RESULTS/fio-1.txt")"
info "no plugin: the daemon serves, the mount takes writes, fio runs"
sleep 3
restart_plugin csi-2
grep -q "adopted the daemon of volume $KEY ($DEV)" "$RESULTS/csi-2.log" ||
    fail "the restarted plugin did not adopt the daemon: $(tail -5 "$RESULTS/csi-2.log")"
grep -q "volume daemon started" "$RESULTS/csi-2.log" && fail "the restarted plugin started a new daemon instead of adopting"
[ "$(record_field pid)" = "$DAEMON_PID" ] || fail "the record names pid $(record_field pid), not $DAEMON_PID"
kill -0 "$fio_pid" 2>/dev/null || fail "round 1: fio ended before the plugin was back; the restart was not under load"
check_stats "round 1, after the restart"
retry_calls "round 1, after the restart"
[ "$(pgrep -f "serve .*$KEY")" = "$DAEMON_PID" ] || fail "retries after adoption changed the daemon: $(pgrep -af "serve .*$KEY")"
wait_fio 1

info "round 2: kill -9 the plugin and the volume daemon while fio runs"
start_fio 2
kill_plugin
kill -9 "$DAEMON_PID"
for _ in $(seq 50); do running "$DAEMON_PID" || break; sleep 0.1; done
running "$DAEMON_PID" && fail "the volume daemon $DAEMON_PID survived kill -9"
[ -z "$(pgrep -f "serve .*$KEY")" ] || fail "a daemon of $KEY still runs: $(pgrep -af "serve .*$KEY")"
[ -e "$DEV" ] || fail "$DEV vanished when its daemon was killed"
sleep 2
kill -0 "$fio_pid" 2>/dev/null || fail "round 2: fio ended while no daemon served $DEV: $(tail -5 "$RESULTS/fio-2.txt")"
restart_plugin csi-3
grep -q "recovered volume $KEY: its daemon had died; $DEV is served again" "$RESULTS/csi-3.log" ||
    fail "the restarted plugin did not recover the device: $(tail -5 "$RESULTS/csi-3.log")"
NEW_PID="$(record_field pid)"
[ "$NEW_PID" != "$DAEMON_PID" ] && running "$NEW_PID" || fail "no new daemon runs (record: pid $NEW_PID)"
grep -qa -- "--recover" "/proc/$NEW_PID/cmdline" || fail "the new daemon was not started with --recover: $(tr '\0' ' ' <"/proc/$NEW_PID/cmdline")"
[ "$(record_field device)" = "$DEV" ] || fail "recovered as $(record_field device), not $DEV"
DAEMON_PID="$NEW_PID"
kill -0 "$fio_pid" 2>/dev/null || fail "round 2: fio ended before the device was recovered"
check_stats "round 2, after the recovery"
retry_calls "round 2, after the recovery"
wait_fio 2
sum_before="$(sha256sum <"$TARGET/plugin-restart.0.0")"

info "upgrade: SIGTERM the plugin, start it again; it adopts the daemon"
kill -TERM "$CSI_PID"
wait "$CSI_PID" || fail "the plugin exited with status $? on SIGTERM"
CSI_PID=""
running "$DAEMON_PID" || fail "the volume daemon stopped with the plugin"
restart_plugin csi-4
grep -q "adopted the daemon of volume $KEY ($DEV)" "$RESULTS/csi-4.log" || fail "the upgraded plugin did not adopt the daemon"
retry_calls "after the upgrade"
check_stats "after the upgrade"

info "unpublish and unstage (each twice) through the plugin that adopted the daemon"
csi unpublish --volume "$VOL_ID" --target "$TARGET"
figure "Unpublish: $(kv elapsed_ms) ms"
csi unpublish --volume "$VOL_ID" --target "$TARGET"
[ ! -e "$TARGET" ] || fail "$TARGET still exists after Unpublish"
csi unstage --volume "$VOL_ID" --staging "$STAGING"
figure "Unstage of an adopted daemon: $(kv elapsed_ms) ms"
csi unstage --volume "$VOL_ID" --staging "$STAGING"
for _ in $(seq 50); do running "$DAEMON_PID" || break; sleep 0.1; done
running "$DAEMON_PID" && fail "the adopted daemon $DAEMON_PID still runs after Unstage"
[ ! -e "$DEV" ] || fail "$DEV still exists after Unstage"
[ ! -e "$CSI_STATE/run/$KEY.json" ] || fail "the daemon record is still there after Unstage"
grep -q " $WORK/" /proc/self/mounts && fail "mounts left after Unstage: $(grep " $WORK/" /proc/self/mounts)"

info "the volume, served directly, passes e2fsck"
start_serve "$CSI_STATE/volumes/$KEY" serve-fsck --socket "$WORK/fsck.sock"
e2fsck -fn "$DEV" >"$RESULTS/e2fsck.txt" 2>&1 || fail "e2fsck after the restarts: $(tail -5 "$RESULTS/e2fsck.txt")"
stop_serve

info "staged and published again, the file fio wrote is unchanged"
stage
DEV="$(record_field device)"
publish
sum_after="$(sha256sum <"$TARGET/plugin-restart.0.0")"
[ "$sum_after" = "$sum_before" ] || fail "the fio file changed across unstage/stage: $sum_before vs $sum_after"
csi unpublish --volume "$VOL_ID" --target "$TARGET"
csi unstage --volume "$VOL_ID" --staging "$STAGING"
csi delete-volume --volume "$VOL_ID"
csi delete-volume --volume "$VOL_ID"
[ ! -e "$CSI_STATE/volumes/$KEY" ] || fail "the volume folder is still there after DeleteVolume"
VOL_ID=""

info "nothing left behind"
left="$(ls /dev/ublkb* /dev/ublkc* 2>/dev/null || true)"
[ -z "$left" ] || fail "ublk devices left: $left"
left="$(pgrep -af 'snapblk serve' || true)"
[ -z "$left" ] || fail "volume daemons left: $left"
left="$(grep " $WORK/" /proc/self/mounts || true)"
[ -z "$left" ] || fail "mounts left: $left"
left="$(ls -A "$CSI_STATE/run")"
[ -z "$left" ] || fail "daemon records left in $CSI_STATE/run: $left"
kill -TERM "$CSI_PID"
wait "$CSI_PID" || fail "the plugin exited with status $? on SIGTERM"
CSI_PID=""
info "ok"
