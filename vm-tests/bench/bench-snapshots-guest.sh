#!/bin/bash
# Guest side of scripts/bench-snapshots (not a test: vm-tests/run only runs
# vm-tests/guest/NN-*.sh). Runs inside the test VM through
#   SNAPBLK_VM_DISK_MIB=N vm-tests/run --shell-cmd "bash vm-tests/bench/bench-snapshots-guest.sh ..."
# with a test's environment (SNAPBLK, WORK, RESULTS, MODTREE, GUEST_LIB,
# VM_SCRATCH_DISK, ...). It drives snapblk through its command line only.
#
# For each file system (ext4, then xfs) made afresh on the scratch disk, with
# the volume folders on it:
#   after  per fio job, a fresh volume filled once; one window of the job to
#          warm up, one measured (before), `snapblk snapshot create`, then
#          consecutive windows of the same job right after, each figure read
#          from fio's per-second log
#   depth  one volume filled once; 4 KiB random read QD32 with one layer (the
#          baseline), then random writes and a snapshot, again and again,
#          with the read measured at each depth asked for, the creation time
#          of the last snapshots and the daemon's memory; every read window
#          measured comes after a warm-up window
# Writes into $RESULTS:
#   after.tsv  fs, job, window (0 = before), figure, unit, status (ok|fail), note
#   depth.tsv  fs, depth, read IOPS, median create ms, creates counted, VmRSS KiB,
#              RssAnon KiB, layers, open files of the daemon, status, note,
#              median create ms as the daemon logs it (total_us; "-" if not logged)
#   info.tsv   key, value
#   fio/, logs/, status/  raw output
# Exits 1 if a measurement failed.

# shellcheck disable=SC2317 source-path=SCRIPTDIR
set -euo pipefail

# One block, so that bash reads all of it before running any of it.
{

usage() {
    cat <<'EOF'
Usage: bench-snapshots-guest.sh [options]   (inside the test VM, with a scratch disk)

  --fs LIST          file systems made on the scratch disk, in turn (default: ext4,xfs)
  --parts LIST       after,depth (default: both)
  --size MIB         volume size in MiB (default: 512)
  --window S         seconds per measured window (default: 8)
  --windows N        windows measured right after the snapshot (default: 3)
  --depths LIST      snapshot counts where reads are measured (default: 1,10,100,1000)
  --writes N         random 4 KiB writes before each snapshot of the depth part (default: 256)
  --queues N         ublk queues (default: 2)
  --depth N          ublk queue depth (default: 128)
  --nofile N         serve under `ulimit -n N` (default: this shell's limit)
  -h, --help         show this help
EOF
}

FS_LIST=ext4,xfs PARTS=after,depth SIZE_MIB=512 WINDOW=8 NWIN=3 DEPTHS=1,10,100,1000 WRITES=256 QUEUES=2 QDEPTH=128 NOFILE=""
need_arg() { [ "$#" -ge 2 ] || { echo "bench-snapshots-guest: option $1 needs a value" >&2; exit 2; }; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --fs) need_arg "$@"; FS_LIST="$2"; shift ;;
        --parts) need_arg "$@"; PARTS="$2"; shift ;;
        --size) need_arg "$@"; SIZE_MIB="$2"; shift ;;
        --window) need_arg "$@"; WINDOW="$2"; shift ;;
        --windows) need_arg "$@"; NWIN="$2"; shift ;;
        --depths) need_arg "$@"; DEPTHS="$2"; shift ;;
        --writes) need_arg "$@"; WRITES="$2"; shift ;;
        --queues) need_arg "$@"; QUEUES="$2"; shift ;;
        --depth) need_arg "$@"; QDEPTH="$2"; shift ;;
        --nofile) need_arg "$@"; NOFILE="$2"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench-snapshots-guest: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
bad() { echo "bench-snapshots-guest: $*" >&2; exit 2; }
for v in SIZE_MIB WINDOW NWIN WRITES QUEUES QDEPTH; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || bad "$v must be a positive number (got '${!v}')"
done
[ -z "$NOFILE" ] || [[ "$NOFILE" =~ ^[1-9][0-9]*$ ]] || bad "--nofile must be a positive number (got '$NOFILE')"
[[ "$DEPTHS" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || bad "--depths must be positive numbers, comma-separated (got '$DEPTHS')"
[[ "$FS_LIST" =~ ^(ext4|xfs)(,(ext4|xfs))*$ ]] || bad "--fs must list ext4 and/or xfs (got '$FS_LIST')"
[[ "$PARTS" =~ ^(after|depth)(,(after|depth))*$ ]] || bad "--parts must list after and/or depth (got '$PARTS')"
for v in GUEST_LIB WORK RESULTS SNAPBLK MODTREE; do
    [ -n "${!v:-}" ] || bad "\$$v is not set: run this through vm-tests/run --shell-cmd"
done
[ -n "${VM_SCRATCH_DISK:-}" ] || bad "no scratch disk: run vm-tests/run with SNAPBLK_VM_DISK_MIB set"
IFS=, read -r -a FSES <<<"$FS_LIST"
IFS=, read -r -a DEPTH_LIST <<<"$DEPTHS"
# depths in increasing order, without repeats (no process substitution: the
# guest has no /dev/fd)
sorted="$(printf '%s\n' "${DEPTH_LIST[@]}" | sort -n -u | tr '\n' ' ')"
read -r -a DEPTH_LIST <<<"$sorted"

# shellcheck source=../guest/lib.sh
. "$GUEST_LIB"

[ -x "$SNAPBLK" ] || fail "snapblk not found: $SNAPBLK (cargo build --release)"
need_cmd fio awk python3 mkfs.ext4 mkfs.xfs

# The after-snapshot jobs: name, fio --rw, --bs, --iodepth, unit of the figure.
JOBS=(
    "randwrite-4k-qd32 randwrite 4k 32 IOPS"
    "seqwrite-128k-qd32 write 128k 32 MiB/s"
    "randrw70-128k-qd32 randrw 128k 32 MiB/s"
)

AFTER_TSV="$RESULTS/after.tsv"
DEPTH_TSV="$RESULTS/depth.tsv"
INFO="$RESULTS/info.tsv"
mkdir -p "$RESULTS/fio" "$RESULTS/logs" "$RESULTS/status"
: >"$AFTER_TSV"
: >"$DEPTH_TSV"
: >"$INFO"
put_info() { printf '%s\t%s\n' "$1" "$2" >>"$INFO"; }
last_lines() { tail -n "${2:-3}" "$1" 2>/dev/null | tr '\n\t' '  ' | cut -c1-300; }

load_ublk
modprobe_mod virtio_blk || fail "cannot load virtio_blk"
wait_for_file "$VM_SCRATCH_DISK" 10 || fail "$VM_SCRATCH_DISK did not appear"
for m in "${FSES[@]}"; do modprobe_mod "$m" || fail "cannot load $m"; done

disk_mib=$(($(blockdev --getsize64 "$VM_SCRATCH_DISK") / 1048576))
put_info kernel "$KERNEL_VERSION"
put_info cpus "$(nproc)"
put_info mem_mib "$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)"
put_info fio "$(fio --version)"
put_info snapblk "$("$SNAPBLK" --version 2>/dev/null | head -n 1 || echo unknown)"
put_info disk "$VM_SCRATCH_DISK, $disk_mib MiB"
put_info size_mib "$SIZE_MIB"
put_info window "$WINDOW"
put_info windows "$NWIN"
put_info writes "$WRITES"
put_info queues "$QUEUES"
put_info depth "$QDEPTH"
if [ -n "$NOFILE" ]; then
    ulimit -n "$NOFILE" || fail "cannot set the open file limit to $NOFILE"
    put_info nofile "$NOFILE (--nofile)"
else
    put_info nofile "$(ulimit -Sn) (the guest's default)"
fi
info "kernel $KERNEL_VERSION; scratch disk $VM_SCRATCH_DISK ($disk_mib MiB); file systems ${FSES[*]}; parts $PARTS"

MNT="$WORK/mnt"
mkdir -p "$MNT"
MOUNTED=0 SERVE_PID="" DEV=""
FAILED=0

# serve_down: stop the daemon if one runs (no test failure: this is a benchmark).
serve_down() {
    local rc=0
    [ -n "$SERVE_PID" ] || return 0
    kill -TERM "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" || rc=$?
    [ "$rc" = 0 ] || echo "warning: snapblk serve exited with status $rc after SIGTERM" >&2
    SERVE_PID=""
    if [ -n "$DEV" ]; then
        for _ in $(seq 100); do [ -e "$DEV" ] || break; sleep 0.1; done
    fi
    DEV=""
}
cleanup() {
    serve_down
    [ "$MOUNTED" = 1 ] && { umount "$MNT" 2>/dev/null || true; }
    return 0
}
trap cleanup EXIT

# serve_up VOL NAME: create a volume of SIZE_MIB in VOL and serve it; sets
# SERVE_PID and DEV. False (with REASON set) on failure.
serve_up() {
    local vol="$1" name="$2" deadline
    REASON=""
    if ! "$SNAPBLK" volume create "$vol" --size "${SIZE_MIB}M" >"$RESULTS/logs/$name.create.out" 2>&1; then
        REASON="volume create failed: $(last_lines "$RESULTS/logs/$name.create.out")"
        return 1
    fi
    "$SNAPBLK" serve "$vol" --queues "$QUEUES" --depth "$QDEPTH" \
        >"$RESULTS/logs/$name.serve.out" 2>"$RESULTS/logs/$name.serve.log" &
    SERVE_PID=$!
    deadline=$(($(date +%s) + 60))
    DEV=""
    while [ -z "$DEV" ]; do
        DEV="$(grep -o '/dev/ublkb[0-9]*' "$RESULTS/logs/$name.serve.out" 2>/dev/null | head -n 1)" || true
        [ -n "$DEV" ] && break
        if ! kill -0 "$SERVE_PID" 2>/dev/null; then
            wait "$SERVE_PID" || true
            SERVE_PID=""
            REASON="snapblk serve exited before its device was live: $(last_lines "$RESULTS/logs/$name.serve.log")"
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            REASON="snapblk serve printed no device after 60 s"
            return 1
        fi
        sleep 0.1
    done
    wait_for_file "$DEV" 10 || { REASON="$DEV did not appear"; return 1; }
}

FIO_COMMON=(--ioengine=io_uring --direct=1 --numjobs=1 --group_reporting --norandommap)

# fill NAME: write the whole device once (1 MiB, QD16) and flush it.
fill() {
    local out="$RESULTS/fio/$1-fill.txt" start
    start="$(date +%s)"
    if ! fio --name=fill --filename="$DEV" "${FIO_COMMON[@]}" --rw=write --bs=1M --iodepth=16 --size=100% \
        --output="$out" >/dev/null 2>"$out.err"; then
        REASON="fill failed: $(last_lines "$out.err")"
        return 1
    fi
    # Flush it to the disk (and so QEMU's image to the host's disk): the window
    # before the snapshot must not pay for the fill's write-back.
    sync -f "$MNT" || sync
    info "  fill of $SIZE_MIB MiB in $(($(date +%s) - start)) s (flushed)"
}

# windows OUT RW BS QD N: run the job for N windows of WINDOW seconds and set
# FIGS to N figures, one per window: the mean of fio's per-second IOPS in that
# window (reads and writes added), or MiB/s for jobs of 128 KiB blocks.
windows() {
    local out="$1" rw="$2" bs="$3" qd="$4" n="$5"
    local -a mix=()
    [ "$rw" = randrw ] && mix=(--rwmixread=70)
    FIGS=""
    rm -f "${out}"_iops.*.log
    if ! fio --name=job --filename="$DEV" "${FIO_COMMON[@]}" --rw="$rw" "${mix[@]}" --bs="$bs" --iodepth="$qd" \
        --time_based --runtime=$((n * WINDOW)) --write_iops_log="$out" --log_avg_msec=1000 \
        --output-format=json --output="$out.json" >/dev/null 2>"$out.err"; then
        REASON="fio $rw $bs failed: $(last_lines "$out.err")"
        return 1
    fi
    local kib="${bs%k}"
    FIGS="$(cat "${out}"_iops.*.log 2>/dev/null | awk -F', *' -v w="$WINDOW" -v n="$n" -v kib="$kib" '
        {
            k = int(($1 + 500) / 1000)   # the second this entry closes (1-based)
            if (k < 1 || k > n * w) next
            win = int((k - 1) / w)
            sum[win, $3] += $2; cnt[win, $3]++
        }
        END {
            for (i = 0; i < n; i++) {
                v = 0; ok = 0
                for (d = 0; d <= 1; d++) if (cnt[i, d] > 0) { v += sum[i, d] / cnt[i, d]; ok = 1 }
                if (!ok) { printf "- "; continue }
                if (kib >= 128) printf "%.1f ", v * kib / 1024; else printf "%d ", v + 0.5
            }
        }')"
    if [ -z "$FIGS" ] || [[ "$FIGS" == *-* ]]; then
        REASON="fio $rw $bs: no per-second figures in its log"
        return 1
    fi
}

# steady OUT RW BS QD: one unmeasured window of the job (caches of the guest's
# file system and of the daemon warm, host write-back settled), then one
# measured window from a fresh fio, as the windows after a snapshot are; sets FIGS.
steady() {
    windows "$1-warmup" "$2" "$3" "$4" 1 && windows "$1" "$2" "$3" "$4" 1
}

# snap NAME VOL: take a snapshot through the CLI (crash-consistent: nothing is
# mounted from the device); sets SNAP_MS.
snap() {
    local t0 t1
    t0="$(date +%s%N)"
    if ! "$SNAPBLK" snapshot create "$1" -V "$2" --freeze none >>"$RESULTS/logs/snapshots.out" 2>&1; then
        REASON="snapshot create $1 failed: $(last_lines "$RESULTS/logs/snapshots.out")"
        return 1
    fi
    t1="$(date +%s%N)"
    SNAP_MS=$(((t1 - t0) / 1000000))
}

after_row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$AFTER_TSV"; }

# after_part FS: the before/after rows of every job on FS.
after_part() {
    local fs="$1" job name rw bs qd unit vol before i
    local -a figs
    for job in "${JOBS[@]}"; do
        read -r name rw bs qd unit <<<"$job"
        info "$fs: $name: fresh volume, fill, ${WINDOW} s warm-up, ${WINDOW} s before, snapshot, ${NWIN} x ${WINDOW} s after"
        vol="$MNT/vol-$name"
        REASON=""
        if serve_up "$vol" "$fs-$name" && fill "$fs-$name" \
            && steady "$RESULTS/fio/$fs-$name-before" "$rw" "$bs" "$qd" && before="$FIGS" \
            && snap "after-$name" "$vol" \
            && windows "$RESULTS/fio/$fs-$name-after" "$rw" "$bs" "$qd" "$NWIN"; then
            read -r -a figs <<<"$FIGS"
            after_row "$fs" "$name" 0 "${before% }" "$unit" ok "snapshot create ${SNAP_MS} ms"
            for ((i = 0; i < NWIN; i++)); do
                after_row "$fs" "$name" $((i + 1)) "${figs[$i]}" "$unit" ok ""
            done
            info "  before: $before$unit; snapshot in $SNAP_MS ms; after: ${FIGS}($unit per window)"
        else
            FAILED=1
            after_row "$fs" "$name" 0 "" "$unit" fail "${REASON:-failed}"
            echo "FAIL: $fs: $name: ${REASON:-failed}"
            tail -n 10 "$RESULTS/logs/$fs-$name.serve.log" 2>/dev/null | sed 's/^/    serve: /' || true
        fi
        serve_down
        rm -rf "$vol"
    done
}

# The writer of the depth part: WRITES random 4 KiB writes over the whole
# device, then a snapshot through the CLI, COUNT times; prints the
# milliseconds of each snapshot create. The writes go through the page cache
# and an fsync before each snapshot, so that they reach the daemon in batches
# (one at a time, each a round trip through the emulated guest, they would
# take most of the run); every one is acknowledged before the snapshot.
WRITER="$WORK/snap-writer.py"
cat >"$WRITER" <<'EOF'
import os, random, subprocess, sys, time
snapblk, dev, vol, first, count, writes, seed = sys.argv[1:8]
first, count, writes = int(first), int(count), int(writes)
rng = random.Random(int(seed))
fd = os.open(dev, os.O_WRONLY)
blocks = os.lseek(fd, 0, os.SEEK_END) // 4096
for n in range(first, first + count):
    for _ in range(writes):
        os.pwrite(fd, rng.randbytes(16) * 256, rng.randrange(blocks) * 4096)
    os.fsync(fd)
    t0 = time.monotonic()
    r = subprocess.run([snapblk, "snapshot", "create", "d%05d" % n, "-V", vol, "--freeze", "none"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ms = (time.monotonic() - t0) * 1000
    if r.returncode != 0:
        sys.stderr.write("snapshot create d%05d failed: %s\n" % (n, r.stderr.strip()[-300:]))
        sys.exit(1)
    print("%d %.1f" % (n, ms), flush=True)
os.close(fd)
EOF

depth_row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" "${DAEMON_MS:--}" >>"$DEPTH_TSV"; }

# daemon_ms LOG: the median of the last (up to) 10 "snapshot taken ... total_us=N"
# lines of the daemon's log, in ms, or "-" when its log says no such thing.
daemon_ms() {
    { grep 'snapshot taken' "$1" 2>/dev/null || true; } | { grep -o 'total_us=[0-9]*' || true; } | tail -n 10 | cut -d= -f2 | sort -n | awk '
        { v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) printf "%.1f\n", v[(NR + 1) / 2] / 1000; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2000 }'
}

# fds_of PID: how many files PID has open, or "-".
fds_of() {
    local f n=0
    [ -d "/proc/$1/fd" ] || { echo -; return; }
    for f in "/proc/$1/fd/"*; do [ -e "$f" ] || [ -L "$f" ] && n=$((n + 1)); done
    echo "$n"
}

# proc_kib PID KEY: a field of /proc/PID/status in KiB, or "-".
proc_kib() { awk -v k="$2:" '$1 == k { print $2; found = 1 } END { if (!found) print "-" }' "/proc/$1/status" 2>/dev/null || echo -; }

# layers_of VOL: the layer count from `snapblk status -o json`, or "-".
layers_of() {
    "$SNAPBLK" status -V "$1" -o json >"$RESULTS/status/$2.json" 2>&1 || { echo -; return; }
    python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
def find(o):
    if isinstance(o, dict):
        for k, v in o.items():
            if k == "layers": return len(v) if isinstance(v, list) else v
            r = find(v)
            if r is not None: return r
    return None
r = find(d)
print("-" if r is None else r)' "$RESULTS/status/$2.json" 2>/dev/null || echo -
}

# depth_part FS: read IOPS, snapshot create time and memory at each depth.
depth_part() {
    local fs="$1" vol="$MNT/vol-depth" have=0 d med n rss anon layers spent fds
    DAEMON_MS=-
    info "$fs: depth: volume, fill, ${WINDOW} s warm-up + ${WINDOW} s of 4 KiB random read QD32 with one layer, then $WRITES writes + 1 snapshot up to ${DEPTH_LIST[-1]} snapshots"
    local times="$RESULTS/logs/$fs-depth-create-ms.txt"
    : >"$times"
    REASON=""
    if ! { serve_up "$vol" "$fs-depth" && fill "$fs-depth" \
        && steady "$RESULTS/fio/$fs-depth-0" randread 4k 32; }; then
        FAILED=1
        depth_row "$fs" 0 "" "" "" "" "" "" "" fail "${REASON:-failed}"
        echo "FAIL: $fs: depth: ${REASON:-failed}"
        serve_down
        rm -rf "$vol"
        return 0
    fi
    depth_row "$fs" 0 "${FIGS% }" - 0 "$(proc_kib "$SERVE_PID" VmRSS)" "$(proc_kib "$SERVE_PID" RssAnon)" \
        "$(layers_of "$vol" "$fs-depth-0")" "$(fds_of "$SERVE_PID")" ok "baseline: one layer"
    info "  0 snapshots: ${FIGS}IOPS"
    for d in "${DEPTH_LIST[@]}"; do
        local start
        start="$(date +%s)"
        if ! python3 "$WRITER" "$SNAPBLK" "$DEV" "$vol" $((have + 1)) $((d - have)) "$WRITES" "$d" \
            >>"$times" 2>"$RESULTS/logs/$fs-depth-writer.err"; then
            REASON="writer: $(last_lines "$RESULTS/logs/$fs-depth-writer.err")"
            FAILED=1
            depth_row "$fs" "$d" "" "" "" "" "" "" "$(fds_of "$SERVE_PID")" fail "$REASON"
            echo "FAIL: $fs: depth $d: $REASON"
            break
        fi
        have="$d"
        spent=$(($(date +%s) - start))
        # median of the last (up to) 10 creates
        read -r med n <<<"$(tail -n 10 "$times" | awk '{ print $2 }' | sort -n | awk '
            { v[NR] = $1 } END { if (NR == 0) print "- 0"; else if (NR % 2) print v[(NR + 1) / 2], NR; else print (v[NR / 2] + v[NR / 2 + 1]) / 2, NR }')"
        rss="$(proc_kib "$SERVE_PID" VmRSS)"
        anon="$(proc_kib "$SERVE_PID" RssAnon)"
        layers="$(layers_of "$vol" "$fs-depth-$d")"
        fds="$(fds_of "$SERVE_PID")"
        DAEMON_MS="$(daemon_ms "$RESULTS/logs/$fs-depth.serve.log")"
        if steady "$RESULTS/fio/$fs-depth-$d" randread 4k 32; then
            depth_row "$fs" "$d" "${FIGS% }" "$med" "$n" "$rss" "$anon" "$layers" "$fds" ok "writes and snapshots in $spent s"
            info "  $d snapshots: ${FIGS}IOPS; create ${med} ms (median of $n; daemon $DAEMON_MS ms); VmRSS $rss KiB, RssAnon $anon KiB; layers $layers; $fds open files"
        else
            FAILED=1
            depth_row "$fs" "$d" "" "$med" "$n" "$rss" "$anon" "$layers" "$fds" fail "$REASON"
            echo "FAIL: $fs: depth $d: $REASON"
        fi
    done
    serve_down
    rm -rf "$vol"
}

for fs in "${FSES[@]}"; do
    info "$fs on $VM_SCRATCH_DISK"
    case "$fs" in
        ext4) mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$VM_SCRATCH_DISK" ;;
        xfs) mkfs.xfs -q -f "$VM_SCRATCH_DISK" ;;
    esac || fail "mkfs.$fs $VM_SCRATCH_DISK failed"
    mount -t "$fs" "$VM_SCRATCH_DISK" "$MNT" || fail "cannot mount $fs from $VM_SCRATCH_DISK"
    MOUNTED=1
    [[ ",$PARTS," == *,after,* ]] && after_part "$fs"
    [[ ",$PARTS," == *,depth,* ]] && depth_part "$fs"
    umount "$MNT" || fail "cannot unmount $MNT"
    MOUNTED=0
done

info "results in \$RESULTS (after.tsv, depth.tsv)"
exit "$FAILED"
}
