#!/bin/bash
# Refusals: serving a missing folder, a folder that is no volume, a volume with a
# damaged manifest, a volume already served, or recovering a device that does not
# exist, fails with a clear message and a non-zero exit, and creates no device.
# timeout: 300
set -euo pipefail
. "$GUEST_LIB"

load_ublk

devices() {
    ls /sys/class/ublk-char 2>/dev/null | sort | tr '\n' ' '
}

# expect_refusal NAME PATTERN ARGS...: `snapblk serve ARGS` must exit non-zero within
# 30 s, print PATTERN (extended regex) on stderr, and leave the set of devices as it was.
expect_refusal() {
    local name="$1" pattern="$2" rc=0 before after
    shift 2
    before="$(devices)"
    timeout 30 "$SNAPBLK" serve "$@" >"$RESULTS/$name.out" 2>"$RESULTS/$name.err" || rc=$?
    after="$(devices)"
    [ "$rc" != 0 ] || fail "$name: serve exited 0"
    [ "$rc" != 124 ] || fail "$name: serve still running after 30s"
    grep -Eq "$pattern" "$RESULTS/$name.err" || {
        cat "$RESULTS/$name.err" >&2
        fail "$name: message does not match /$pattern/"
    }
    ! grep -q '^serving volume' "$RESULTS/$name.out" || fail "$name: serve announced a device"
    [ "$before" = "$after" ] || fail "$name: devices changed from [$before] to [$after]"
    info "$name: exit $rc, no device: $(grep -E "$pattern" "$RESULTS/$name.err" | tail -n 1)"
}

expect_refusal missing "$WORK/nope.*(No such file|not found|missing)" "$WORK/nope"

mkdir "$WORK/empty"
expect_refusal not-a-volume "$WORK/empty.*volume" "$WORK/empty"

"$SNAPBLK" volume create "$WORK/bad" --size 64M
printf '{ this is not json' >"$WORK/bad/volume.json"
expect_refusal corrupt-manifest "volume\.json" "$WORK/bad"

"$SNAPBLK" volume create "$WORK/gone" --size 64M
rm -f "$WORK/gone"/layers/*.data
expect_refusal missing-layer "layers/.*\.data" "$WORK/gone"

"$SNAPBLK" volume create "$WORK/vol" --size 64M
expect_refusal recover-nothing "recover" "$WORK/vol" --recover
expect_refusal recover-no-such-id "device 7" "$WORK/vol" --recover --id 7

# A volume already served is refused (the first daemon keeps serving).
"$SNAPBLK" serve "$WORK/vol" >"$RESULTS/first.out" 2>"$RESULTS/first.log" &
pid=$!
for _ in $(seq 600); do grep -q '^serving volume' "$RESULTS/first.out" && break; sleep 0.1; done
grep -q '^serving volume' "$RESULTS/first.out" || fail "the first daemon did not come up"
expect_refusal busy "in use" "$WORK/vol"
kill -0 "$pid" || fail "the first daemon died"
kill -TERM "$pid"
wait "$pid" || fail "the first daemon did not exit cleanly"
[ -z "$(devices)" ] || fail "devices left: $(devices)"
