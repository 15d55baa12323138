#!/bin/bash
# snapblk serve under fio: io_uring direct random writes with crc32c verification over
# the whole device (two jobs, one half each), 4k and mixed 4k-128k, in the driver's
# default data mode and again in forced copy mode.
# timeout: 900
set -euo pipefail
. "$GUEST_LIB"

need_cmd fio
load_ublk

# run_fio NAME ARGS...: fio with verification over the whole device; fails on any error.
run_fio() {
    local name="$1" rc=0
    shift
    info "fio $name on $DEV"
    fio --name="$name" --filename="$DEV" --ioengine=io_uring --direct=1 \
        --rw=randwrite --iodepth=32 --numjobs=2 --size=50% --offset_increment=50% \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting \
        "$@" >"$RESULTS/fio-$name.txt" 2>&1 || rc=$?
    if [ "$rc" != 0 ] || grep -Eq 'err= *[1-9]|verify: bad' "$RESULTS/fio-$name.txt"; then
        tail -30 "$RESULTS/fio-$name.txt" >&2
        dmesg | tail -20 >&2
        fail "fio $name failed (status $rc)"
    fi
    grep -E '^ +(write|read):' "$RESULTS/fio-$name.txt" || true
}

"$SNAPBLK" volume create "$WORK/vol" --size 128M

for mode in default copy; do
    args=()
    [ "$mode" = copy ] && args=(--copy)
    start_serve "$WORK/vol" "serve-$mode" "${args[@]}"
    grep -o 'data mode mode="[a-z-]*"[^"]*"[^"]*"' "$RESULTS/serve-$mode.log" | head -n 1 || true
    [ "$(cat "/sys/block/${DEV#/dev/}/size")" = $((128 * 2048)) ] || fail "$DEV has the wrong size"
    [ "$(cat "/sys/block/${DEV#/dev/}/queue/logical_block_size")" = 4096 ] || fail "wrong logical block size"
    run_fio "$mode-4k" --bs=4k
    run_fio "$mode-mixed" --bssplit=4k/40:16k/20:64k/20:128k/20
    stop_serve
    info "$mode mode: no fio error"
done
