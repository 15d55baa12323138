#!/bin/bash
# The metrics endpoint of the CSI driver (snapblk csi all-in-one --metrics-addr) on the
# real ublk driver:
# - a raw block volume under fio (4 KiB, direct, one request at a time, so the kernel
#   neither merges nor splits): the endpoint is scraped before, during and after, and the
#   growth of the volume's write and read counters (requests, bytes, latency count) is
#   exactly what fio reports; samples taken during fio lie in between and never go back;
# - CreateSnapshot of the block volume adds one snapshot; of a mounted ext4 volume, one
#   freeze window too;
# - a hung volume daemon (SIGSTOP) is reported down (snapblk_volume_up 0) without
#   holding the scrape, and up again once it runs;
# - the driver's own CSI calls are counted by method and code, the node's space is there.
# The guest's loopback is down at boot: the test brings it up.
# timeout: 900
# kernels: 7
set -euo pipefail
. "$GUEST_LIB"

need_cmd curl fio python3 ip
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"

STOPPED_PID=""
SCRAPER_PID=""
cleanup() {
    [ -n "$STOPPED_PID" ] && kill -CONT "$STOPPED_PID" 2>/dev/null || true
    [ -n "$SCRAPER_PID" ] && kill "$SCRAPER_PID" 2>/dev/null || true
    { grep -o " $WORK/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount "$m" 2>/dev/null || true; done
    [ -n "${CSI_PID:-}" ] && kill "$CSI_PID" 2>/dev/null || true
}
trap cleanup EXIT

ip link set lo up || fail "cannot bring the loopback interface up"
PORT=9812
URL="http://127.0.0.1:$PORT/metrics"
start_csi driver --metrics-addr "127.0.0.1:$PORT"

# scrape FILE: the endpoint's answer into FILE; fails the test on an HTTP error.
scrape() {
    curl -sS --fail --max-time 30 -o "$1" "$URL" || fail "scraping $URL failed"
    tail -n 1 "$1" | grep -qx '# EOF' || fail "the answer does not end with # EOF: $(tail -n 3 "$1")"
}

# metric FILE SERIES: the value of SERIES (name and labels, exactly) in FILE, or
# nothing when it is absent.
metric() {
    awk -v s="$2" 'index($0, s " ") == 1 { print $2; exit }' "$1"
}

# io FILE NAME DIRECTION: a per-volume, per-direction series of $VOL (0 when absent).
io() {
    local v
    v=$(metric "$1" "$2{volume_id=\"$VOL\",direction=\"$3\"}")
    echo "${v:-0}"
}

# mvol FILE NAME VOLUME: a per-volume series.
mvol() {
    metric "$1" "$2{volume_id=\"$3\"}"
}

info "a raw block volume, staged and published"
csi create-volume --name pvc-metrics-block --size $((64 << 20)) --node "$CSI_NODE" --block
VOL=$(kv volume_id)
mkdir -p "$WORK/blk/staging" "$WORK/blk/pod"
csi stage --volume "$VOL" --staging "$WORK/blk/staging" --block
csi publish --volume "$VOL" --staging "$WORK/blk/staging" --target "$WORK/blk/dev" --block
DEV="$WORK/blk/dev"

sleep 1
scrape "$WORK/m0"
[ "$(mvol "$WORK/m0" snapblk_volume_up "$VOL")" = 1 ] || fail "the volume is not up: $(grep snapblk_volume_up "$WORK/m0")"
[ "$(metric "$WORK/m0" snapblk_node_volumes_served)" = 1 ] || fail "volumes served: $(grep volumes_served "$WORK/m0")"
free=$(metric "$WORK/m0" snapblk_node_free_bytes)
[ -n "$free" ] && [ "${free%.*}" -gt 0 ] || fail "no node free space: $(grep snapblk_node_ "$WORK/m0")"

# scrape_loop PREFIX: scrapes into PREFIX.N every 0.2 s until killed.
scrape_loop() {
    local n=0
    while :; do
        n=$((n + 1))
        curl -sS --fail --max-time 30 -o "$1.$n" "$URL" 2>/dev/null || rm -f "$1.$n"
        sleep 0.2
    done
}

run_fio() {
    fio --name="$1" --filename="$DEV" --rw="$1" --bs=4k --io_size="$2" --size=64M \
        --direct=1 --ioengine=psync --iodepth=1 --invalidate=0 --randrepeat=1 \
        --output-format=json --output="$WORK/$1.json" || fail "fio $1 failed"
}

# fio_figure FILE DIRECTION KEY: total_ios or io_bytes of the job.
fio_figure() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["jobs"][0][sys.argv[2]][sys.argv[3]])' "$@"
}

check_direction() { # BEFORE AFTER DIRECTION FIO_JSON FIO_DIR
    local before="$1" after="$2" dir="$3" ios bytes dreq dbytes dcount derr
    ios=$(fio_figure "$4" "$5" total_ios)
    bytes=$(fio_figure "$4" "$5" io_bytes)
    dreq=$(($(io "$after" snapblk_volume_io_requests_total "$dir") - $(io "$before" snapblk_volume_io_requests_total "$dir")))
    dbytes=$(($(io "$after" snapblk_volume_io_bytes_total "$dir") - $(io "$before" snapblk_volume_io_bytes_total "$dir")))
    dcount=$(($(io "$after" snapblk_volume_io_duration_seconds_count "$dir") - $(io "$before" snapblk_volume_io_duration_seconds_count "$dir")))
    derr=$(($(io "$after" snapblk_volume_io_errors_total "$dir") - $(io "$before" snapblk_volume_io_errors_total "$dir")))
    info "$dir: fio $ios requests, $bytes bytes; metrics +$dreq requests, +$dbytes bytes, +$dcount timed, +$derr errors"
    [ "$ios" -gt 0 ] || fail "fio did no $dir"
    [ "$dreq" = "$ios" ] || fail "$dir requests grew by $dreq, fio made $ios"
    [ "$dbytes" = "$bytes" ] || fail "$dir bytes grew by $dbytes, fio moved $bytes"
    [ "$dcount" = "$ios" ] || fail "$dir latency count grew by $dcount, fio made $ios"
    [ "$derr" = 0 ] || fail "$derr $dir errors"
}

# check_samples BEFORE AFTER DIRECTION PREFIX: every sample taken during fio lies between
# BEFORE and AFTER, in order, and at least one strictly inside.
check_samples() {
    local lo hi prev v inside=0 n=0 f
    lo=$(io "$1" snapblk_volume_io_requests_total "$3")
    hi=$(io "$2" snapblk_volume_io_requests_total "$3")
    prev=$lo
    for f in $(printf '%s\n' "$4".* | awk -F. '{print $NF "\t" $0}' | sort -n | cut -f2-); do
        [ -e "$f" ] || continue
        tail -n 1 "$f" | grep -qx '# EOF' || continue
        v=$(io "$f" snapblk_volume_io_requests_total "$3")
        n=$((n + 1))
        [ "$v" -ge "$prev" ] || fail "$3 requests went back from $prev to $v during fio ($f)"
        [ "$v" -le "$hi" ] || fail "$3 requests $v during fio, more than the $hi after"
        [ "$v" -gt "$lo" ] && [ "$v" -lt "$hi" ] && inside=$((inside + 1))
        prev=$v
    done
    info "$3: $n scrapes during fio, $inside of them mid-run"
    [ "$inside" -gt 0 ] || fail "no scrape during fio saw the $3 counter between $lo and $hi ($n scrapes)"
}

info "fio: random 4 KiB writes, scraped meanwhile"
scrape_loop "$WORK/during-w" &
SCRAPER_PID=$!
t0=$(date +%s%N)
run_fio randwrite 48M
kill "$SCRAPER_PID"
wait "$SCRAPER_PID" 2>/dev/null || true
SCRAPER_PID=""
info "fio randwrite took $((($(date +%s%N) - t0) / 1000000)) ms"
scrape "$WORK/m1"
check_direction "$WORK/m0" "$WORK/m1" write "$WORK/randwrite.json" write
check_samples "$WORK/m0" "$WORK/m1" write "$WORK/during-w"
[ "$(io "$WORK/m1" snapblk_volume_io_requests_total read)" = "$(io "$WORK/m0" snapblk_volume_io_requests_total read)" ] ||
    fail "reads counted during a write-only run"

info "fio: random 4 KiB reads, scraped meanwhile"
scrape_loop "$WORK/during-r" &
SCRAPER_PID=$!
run_fio randread 32M
kill "$SCRAPER_PID"
wait "$SCRAPER_PID" 2>/dev/null || true
SCRAPER_PID=""
scrape "$WORK/m2"
check_direction "$WORK/m1" "$WORK/m2" read "$WORK/randread.json" read
check_samples "$WORK/m1" "$WORK/m2" read "$WORK/during-r"
[ "$(io "$WORK/m2" snapblk_volume_io_requests_total write)" = "$(io "$WORK/m1" snapblk_volume_io_requests_total write)" ] ||
    fail "writes counted during a read-only run"
# Buckets are cumulative and end with every request.
le_inf=$(metric "$WORK/m2" "snapblk_volume_io_duration_seconds_bucket{le=\"+Inf\",volume_id=\"$VOL\",direction=\"read\"}")
[ "$le_inf" = "$(io "$WORK/m2" snapblk_volume_io_duration_seconds_count read)" ] || fail "the +Inf bucket ($le_inf) is not the count"
info "write latency: $(python3 -c "
import sys
s = {}
for l in open(sys.argv[1]):
    if l.startswith('snapblk_volume_io_duration_seconds_') and 'direction=\"write\"' in l and sys.argv[2] in l:
        k = l.split('{')[0].rsplit('_', 1)[1]
        s[k] = float(l.split()[-1])
print('mean %.0f us over %d requests' % (s['sum'] / s['count'] * 1e6, s['count']))" "$WORK/m2" "$VOL")"

info "a snapshot of the block volume"
stored=$(mvol "$WORK/m2" snapblk_volume_stored_bytes "$VOL")
[ "${stored%.*}" -gt 0 ] || fail "stored bytes after writes: $stored"
csi create-snapshot --volume "$VOL" --name snapshot-metrics-1
scrape "$WORK/m3"
[ "$(mvol "$WORK/m3" snapblk_volume_snapshots "$VOL")" = 1 ] || fail "snapshots: $(grep "snapblk_volume_snapshots" "$WORK/m3")"
[ "$(mvol "$WORK/m3" snapblk_volume_snapshots_created_total "$VOL")" = 1 ] || fail "snapshots created: $(grep snapshots_created "$WORK/m3")"
[ "$(mvol "$WORK/m3" snapblk_volume_freeze_duration_seconds_count "$VOL")" = 0 ] || fail "a raw block volume has nothing to freeze"

info "a mounted ext4 volume: its snapshot holds a freeze window"
csi create-volume --name pvc-metrics-ext4 --size $((64 << 20)) --node "$CSI_NODE" --fs ext4
FVOL=$(kv volume_id)
mkdir -p "$WORK/fs/staging" "$WORK/fs/pod"
csi stage --volume "$FVOL" --staging "$WORK/fs/staging" --fs ext4
csi publish --volume "$FVOL" --staging "$WORK/fs/staging" --target "$WORK/fs/pod/mount" --fs ext4
head -c 4M /dev/urandom >"$WORK/fs/pod/mount/data"
sync
scrape "$WORK/m4"
[ "$(mvol "$WORK/m4" snapblk_volume_freeze_duration_seconds_count "$FVOL")" = 0 ] || fail "a freeze before any snapshot"
csi create-snapshot --volume "$FVOL" --name snapshot-metrics-ext4
grep -q "took snapshot.*volume=${FVOL#*/} .*consistency=\"application\"" "$RESULTS/driver.log" ||
    fail "the ext4 snapshot was not application-consistent: $(grep 'took snapshot' "$RESULTS/driver.log" | tail -2)"
scrape "$WORK/m5"
[ "$(mvol "$WORK/m5" snapblk_volume_freeze_duration_seconds_count "$FVOL")" = 1 ] ||
    fail "freeze windows: $(grep "freeze_duration_seconds_count" "$WORK/m5")"
frozen=$(mvol "$WORK/m5" snapblk_volume_freeze_duration_seconds_sum "$FVOL")
python3 -c "import sys; v = float(sys.argv[1]); sys.exit(0 if 0 < v < 10 else 1)" "$frozen" || fail "freeze window of $frozen s"
info "ext4 frozen for $frozen s"
[ "$(mvol "$WORK/m5" snapblk_volume_snapshots "$FVOL")" = 1 ] || fail "ext4 snapshots: $(grep snapblk_volume_snapshots "$WORK/m5")"
[ "$(metric "$WORK/m5" snapblk_node_volumes_served)" = 2 ] || fail "volumes served: $(grep volumes_served "$WORK/m5")"
ok_snaps=$(metric "$WORK/m5" 'snapblk_csi_rpc_requests_total{service="csi.v1.Controller",method="CreateSnapshot",code="OK"}')
[ "$ok_snaps" = 2 ] || fail "CreateSnapshot OK calls counted: ${ok_snaps:-none}"
stages=$(metric "$WORK/m5" 'snapblk_csi_rpc_requests_total{service="csi.v1.Node",method="NodeStageVolume",code="OK"}')
[ "$stages" = 2 ] || fail "NodeStageVolume OK calls counted: ${stages:-none}"

info "a hung daemon is reported down without holding the scrape"
key=${VOL#*/}
pid=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$CSI_STATE/run/$key.json")
kill -STOP "$pid"
STOPPED_PID=$pid
t0=$(date +%s%N)
scrape "$WORK/m6"
took=$((($(date +%s%N) - t0) / 1000000))
kill -CONT "$pid"
STOPPED_PID=""
info "scrape with a hung daemon: $took ms"
[ "$took" -lt 15000 ] || fail "the scrape waited $took ms for a hung daemon"
[ "$(mvol "$WORK/m6" snapblk_volume_up "$VOL")" = 0 ] || fail "the hung daemon is not down: $(grep snapblk_volume_up "$WORK/m6")"
[ "$(mvol "$WORK/m6" snapblk_volume_up "$FVOL")" = 1 ] || fail "the other volume is not up: $(grep snapblk_volume_up "$WORK/m6")"
sleep 1
scrape "$WORK/m7"
[ "$(mvol "$WORK/m7" snapblk_volume_up "$VOL")" = 1 ] || fail "the daemon is not up again: $(grep snapblk_volume_up "$WORK/m7")"
[ "$(io "$WORK/m7" snapblk_volume_io_requests_total write)" = "$(io "$WORK/m2" snapblk_volume_io_requests_total write)" ] ||
    fail "write counters changed with no writes"

info "only GET /metrics"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/")
[ "$code" = 404 ] || fail "GET / answered $code"

info "clean up"
csi unpublish --volume "$FVOL" --target "$WORK/fs/pod/mount"
csi unstage --volume "$FVOL" --staging "$WORK/fs/staging"
csi unpublish --volume "$VOL" --target "$WORK/blk/dev"
csi unstage --volume "$VOL" --staging "$WORK/blk/staging"
scrape "$WORK/m8"
[ "$(metric "$WORK/m8" snapblk_node_volumes_served)" = 0 ] || fail "volumes served after unstaging: $(grep volumes_served "$WORK/m8")"
! grep -q '^snapblk_volume_' "$WORK/m8" || fail "volume series after unstaging: $(grep '^snapblk_volume_' "$WORK/m8" | head -3)"
