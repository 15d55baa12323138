#!/bin/bash
# kill -9 of the daemon while `snapshot create` cuts, with writes running: fio writes the
# raw device without any flush (every acknowledged write must survive the daemon's
# death, cut or no cut), snapshots are taken one after another through the control
# socket, and the daemon is killed once a cut has begun (its new head's file exists),
# 0 to 5 ms later in 12 rounds, so the kill lands at different steps of the cut. `serve --recover` takes the same device over, fio goes on
# and verifies every block at the end; the volume then lists whole snapshots only (each
# readable end to end), and only the head's volatile journal is left in /dev/shm.
# timeout: 900
set -euo pipefail
. "$GUEST_LIB"

need_cmd fio python3 jq
load_ublk

SOCK="$WORK/vol.sock"
FIO_PID=""
cleanup() {
    local rc=$?
    trap - EXIT
    set +e
    if [ "$rc" != 0 ] && [ -n "$FIO_PID" ]; then
        if ! kill -0 "${SERVE_PID:-0}" 2>/dev/null; then
            "$SNAPBLK" serve "$WORK/vol" --recover --socket "$SOCK" >/dev/null 2>"$RESULTS/serve-cleanup.log" &
            SERVE_PID=$!
            sleep 5
        fi
        kill -9 "$FIO_PID" 2>/dev/null
        sleep 1
        kill -TERM "$SERVE_PID" 2>/dev/null
        wait "$SERVE_PID" 2>/dev/null
    fi
    exit "$rc"
}
trap cleanup EXIT

"$SNAPBLK" volume create "$WORK/vol" --size 128M
start_serve "$WORK/vol" serve-first --socket "$SOCK"
first_dev="$DEV"
id="$(head -n 1 "$WORK/vol/volume.json" | jq -r .volume_id)"

# Rate limited (about 50 s of writes) so that the rounds land in the middle of them; no
# sync, no fsync: only acknowledgement protects the data. Verification reads it all back.
fio --name=cut --filename="$DEV" --size=96M --ioengine=io_uring --direct=1 \
    --rw=randwrite --bs=4k --iodepth=16 --rate_iops=,500 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 >"$RESULTS/fio.txt" 2>&1 &
FIO_PID=$!
sleep 2

n=0
# The cut's first step creates the new head's data file, named by the manifest's
# next_layer_id: once it appears the daemon is inside the cut (a few ms long in a VM), and
# a watcher started beforehand kills it a different number of microseconds later each
# round, so the kill lands at different steps of the cut (folder sync, manifest commit,
# switch, drain, seal, second commit) or just after it.
killer() {
    python3 - "$@" <<'PY'
import os, sys, time
path, pid, delay_us = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 20
while not os.path.exists(path):
    if time.monotonic() > deadline:
        sys.exit("the cut did not start: no " + path)
t = time.perf_counter() + delay_us / 1e6
while time.perf_counter() < t:
    pass
os.kill(pid, 9)
PY
}
delays=(0 100 200 300 500 700 1000 1300 1700 2200 3000 5000)
rounds=${#delays[@]}
in_cut=0
for round in $(seq 1 "$rounds"); do
    kill -0 "$FIO_PID" 2>/dev/null || info "round $round: fio has finished its writes (it may be verifying)"
    # A few snapshots that finish, then one that the kill interrupts.
    for _ in 1 2; do
        n=$((n + 1))
        "$SNAPBLK" snapshot create "s$n" -V vol --socket "$SOCK" --freeze none -o json >"$RESULTS/snap-$n.json" ||
            fail "snapshot s$n failed: $(cat "$RESULTS/snap-$n.json")"
    done
    n=$((n + 1))
    next="$(head -n 1 "$WORK/vol/volume.json" | jq -r .next_layer_id)"
    delay="${delays[$((round - 1))]}"
    killer "$WORK/vol/layers/$next.data" "$SERVE_PID" "$delay" &
    killer_pid=$!
    sleep 0.3
    "$SNAPBLK" snapshot create "s$n" -V vol --socket "$SOCK" --freeze none -o json >"$RESULTS/snap-$n.json" 2>&1 || true
    wait "$killer_pid" || fail "round $round: the watcher did not kill the daemon"
    wait "$SERVE_PID" 2>/dev/null || true
    [ -e "$DEV" ] || fail "$DEV vanished when its daemon was killed"
    if grep -q '"created": true' "$RESULTS/snap-$n.json"; then
        info "round $round: daemon killed $delay us into the cut of s$n, after it answered"
    else
        in_cut=$((in_cut + 1))
        info "round $round: daemon killed $delay us into the cut of s$n, before it answered"
    fi
    start_serve "$WORK/vol" "serve-recover-$round" --recover --socket "$SOCK"
    [ "$DEV" = "$first_dev" ] || fail "recovered as $DEV, not $first_dev"
    grep -q 'reattached' "$RESULTS/serve-recover-$round.log" || fail "the new daemon did not reattach"
done

rc=0
wait "$FIO_PID" || rc=$?
FIO_PID=""
if [ "$rc" != 0 ] || grep -Eq 'err= *[1-9]|verify: bad' "$RESULTS/fio.txt"; then
    tail -30 "$RESULTS/fio.txt" >&2
    dmesg | tail -30 >&2
    fail "fio failed across the kills during cuts (status $rc)"
fi
info "fio completed and verified every block across $rounds kills during cuts ($in_cut before the cut answered)"
[ "$in_cut" -gt 0 ] || fail "no kill landed before a cut answered: the test did not test anything"

"$SNAPBLK" snapshot list -V vol --socket "$SOCK" -o json >"$RESULTS/snapshots.json"
names="$(jq -r '.[].name' "$RESULTS/snapshots.json")"
count="$(echo "$names" | grep -c . || true)"
last="$(echo "$names" | tail -n 1)"
[ "$count" -ge $((2 * rounds)) ] || fail "only $count snapshots listed, the $((2 * rounds)) finished ones at least were expected"
stop_serve
# Every listed snapshot's layers read back from the volume's files: the oldest and the
# newest snapshot whole, each one between as what changed since the one before it, so
# every block any of them holds is read once (exporting each snapshot whole read the
# volume's data 24 times over and took most of the test).
prev=""
for s in $names; do
    since=()
    [ -n "$prev" ] && [ "$s" != "$last" ] && since=(--since "$prev")
    "$SNAPBLK" export "$WORK/vol" "$s" "${since[@]}" -o "$WORK/export.bin" >/dev/null 2>"$RESULTS/export.log" ||
        fail "snapshot $s${prev:+ (since $prev)} does not read back: $(tail -3 "$RESULTS/export.log")"
    rm -f "$WORK/export.bin"
    prev="$s"
done
info "$count snapshots, each readable end to end"
left="$(ls /dev/shm | grep -c "^snapblk-$id-" || true)"
[ "$left" -le 1 ] || fail "$left volatile journals of the volume left in /dev/shm: $(ls /dev/shm)"
