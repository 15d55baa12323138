#!/bin/bash
# `serve --recover --id N` takes over only the device made for its volume, even when
# libublk's record of the device (/run/ublksrvd/NNNN.json) is gone: the daemon of volume
# a is killed, its json removed, and volume b (same size and block size) is refused the
# device with a clear message while the device keeps waiting; volume a then takes it
# back and its data is intact.
# timeout: 300
set -euo pipefail
. "$GUEST_LIB"

load_ublk

cleanup() {
    local p
    for p in ${SERVE_PID:-} ${B_PID:-}; do kill -TERM "$p" 2>/dev/null || true; done
    for p in ${SERVE_PID:-} ${B_PID:-}; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

"$SNAPBLK" volume create "$WORK/a" --size 64M
"$SNAPBLK" volume create "$WORK/b" --size 64M
start_serve "$WORK/a" serve-a
id="${DEV#/dev/ublkb}"
head -c 1M /dev/urandom >"$WORK/pattern"
dd if="$WORK/pattern" of="$DEV" bs=64K oflag=direct status=none
kill -9 "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=""
[ -e "$DEV" ] || fail "$DEV vanished with its daemon"
json="/run/ublksrvd/$(printf '%04d' "$id").json"
[ -f "$json" ] || fail "libublk's json $json is missing before the test removes it"
rm -f "$json"
info "daemon of a killed, $json removed; volume b asks for device $id"

rc=0
timeout 60 "$SNAPBLK" serve "$WORK/b" --recover --id "$id" >"$RESULTS/serve-b.out" 2>"$RESULTS/serve-b.log" &
B_PID=$!
wait "$B_PID" || rc=$?
B_PID=""
if [ "$rc" = 0 ] || [ "$rc" = 124 ] || grep -q '^serving volume' "$RESULTS/serve-b.out"; then
    fail "volume b took over the device of volume a (exit $rc): $(tail -5 "$RESULTS/serve-b.log")"
fi
grep -q "not the device of volume" "$RESULTS/serve-b.log" ||
    fail "unclear refusal: $(tail -5 "$RESULTS/serve-b.log")"
info "refused: $(grep 'not the device of volume' "$RESULTS/serve-b.log" | tail -n 1)"
[ -e "$DEV" ] || fail "the refused recovery removed $DEV"

start_serve "$WORK/a" serve-a2 --recover --id "$id"
[ "$DEV" = "/dev/ublkb$id" ] || fail "volume a came back as $DEV, not /dev/ublkb$id"
grep -q reattached "$RESULTS/serve-a2.log" || fail "volume a did not reattach its device"
cmp -n 1048576 "$WORK/pattern" "$DEV" || fail "volume a's data differs after the recovery"
stop_serve
SERVE_PID=""
