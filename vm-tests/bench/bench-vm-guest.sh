#!/bin/bash
# Guest side of scripts/bench-vm (not a test: vm-tests/run only runs
# vm-tests/guest/NN-*.sh). Runs inside the test VM through
#   vm-tests/run --shell-cmd "bash vm-tests/bench/bench-vm-guest.sh --rublk PATH ..."
# with a test's environment (SNAPBLK, WORK, RESULTS, MODTREE, GUEST_LIB, ...).
#
# Runs the same fio jobs against a kernel loop device, rublk's loop target and
# a snapblk device (both in copy and zero-copy mode), each on a fresh backing
# file of the same size on the same file system: by default with every device
# live and each job run on all of them in turn (--order jobs), or one device
# at a time (--order devices).
# Writes into $RESULTS:
#   results.tsv  round, target, job, status (ok|skip|fail), IOPS, KiB/s, note
#   info.tsv     key, value: kernel, backing file system, features, settings
#   fio/         fio's output of every job (JSON, then one terse v3 line)
#   logs/        rublk and snapblk output
# Exits 1 if a target that should have run failed.

# Functions below are called by name (traps, "${kind}_up"):
# shellcheck disable=SC2317 source-path=SCRIPTDIR
set -euo pipefail

# One block, so that bash reads all of it before running any of it.
{

usage() {
    cat <<'EOF'
Usage: bench-vm-guest.sh --rublk PATH [options]   (inside the test VM)

  --rublk PATH       rublk binary (built with: cargo install rublk --no-default-features)
  --runtime S        seconds each fio job is measured (default: 10)
  --ramp S           seconds each job runs before it is measured (default: 2)
  --size MIB         size of each backing file / volume in MiB (default: 512)
  --queues N         ublk queues, rublk and snapblk alike (default: 2)
  --depth N          ublk queue depth, rublk and snapblk alike (default: 128)
  --rounds N         run every target N times, order reversed every other round (default: 1)
  --backing KIND     auto (default): tmpfs if it takes O_DIRECT, else ext4 on a ramdisk;
                     tmpfs; ext4 (ext4 on a brd ramdisk)
  --order ORDER      jobs (default): every device live at once, each job run on every
                     device in turn (so that drifting host load hits all alike);
                     devices: one device at a time, all its jobs, removed before the next
  --pin-queues       serve snapblk with --pin-queues (queue threads pinned per queue,
                     as libublk and so rublk place them)
  --jobs LIST        only these jobs, comma-separated names (default: all six:
                     randread-4k-qd1,randread-4k-qd32,seqread-128k-qd32,
                     randwrite-4k-qd1,randwrite-4k-qd32,seqwrite-128k-qd32)
  -h, --help         show this help
EOF
}

ONLY_JOBS="" RUBLK="" RUNTIME=10 RAMP=2 SIZE_MIB=512 QUEUES=2 DEPTH=128 ROUNDS=1 BACKING=auto ORDER=jobs PIN=()
need_arg() { [ "$#" -ge 2 ] || { echo "bench-vm-guest: option $1 needs a value" >&2; exit 2; }; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --rublk) need_arg "$@"; RUBLK="$2"; shift ;;
        --runtime) need_arg "$@"; RUNTIME="$2"; shift ;;
        --ramp) need_arg "$@"; RAMP="$2"; shift ;;
        --size) need_arg "$@"; SIZE_MIB="$2"; shift ;;
        --queues) need_arg "$@"; QUEUES="$2"; shift ;;
        --depth) need_arg "$@"; DEPTH="$2"; shift ;;
        --rounds) need_arg "$@"; ROUNDS="$2"; shift ;;
        --backing) need_arg "$@"; BACKING="$2"; shift ;;
        --order) need_arg "$@"; ORDER="$2"; shift ;;
        --jobs) need_arg "$@"; ONLY_JOBS="$2"; shift ;;
        --pin-queues) PIN=(--pin-queues) ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench-vm-guest: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

for v in RUNTIME SIZE_MIB QUEUES DEPTH ROUNDS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "bench-vm-guest: $v must be a positive number (got '${!v}')" >&2; exit 2; }
done
[[ "$RAMP" =~ ^[0-9]+$ ]] || { echo "bench-vm-guest: --ramp must be a number (got '$RAMP')" >&2; exit 2; }
case "$BACKING" in auto | tmpfs | ext4) ;; *) echo "bench-vm-guest: --backing must be auto, tmpfs or ext4" >&2; exit 2 ;; esac
case "$ORDER" in jobs | devices) ;; *) echo "bench-vm-guest: --order must be jobs or devices" >&2; exit 2 ;; esac
for v in GUEST_LIB WORK RESULTS SNAPBLK MODTREE; do
    [ -n "${!v:-}" ] || { echo "bench-vm-guest: \$$v is not set: run this through vm-tests/run --shell-cmd" >&2; exit 2; }
done

# shellcheck source=../guest/lib.sh
. "$GUEST_LIB"

[ -n "$RUBLK" ] || fail "--rublk PATH is required"
[ -x "$RUBLK" ] || fail "rublk not found or not executable: $RUBLK"
[ -x "$SNAPBLK" ] || fail "snapblk not found: $SNAPBLK (cargo build --release)"
need_cmd fio losetup awk truncate

# The jobs: name, fio --rw, --bs, --iodepth. Reads come first, right after
# the prefill, so that every read hits written data.
JOBS=(
    "randread-4k-qd1 randread 4k 1"
    "randread-4k-qd32 randread 4k 32"
    "seqread-128k-qd32 read 128k 32"
    "randwrite-4k-qd1 randwrite 4k 1"
    "randwrite-4k-qd32 randwrite 4k 32"
    "seqwrite-128k-qd32 write 128k 32"
)
if [ -n "$ONLY_JOBS" ]; then
    kept=()
    for job in "${JOBS[@]}"; do
        [[ ",$ONLY_JOBS," == *",${job%% *},"* ]] && kept+=("$job")
    done
    [ "${#kept[@]}" -gt 0 ] || fail "--jobs $ONLY_JOBS names no known job"
    JOBS=("${kept[@]}")
fi
TARGETS=(loop rublk-copy snapblk-copy rublk-zc snapblk-zc)
declare -A DEV=() STATE=() REASON=() NOTE=() LOOPDEV=() RUBLKID=() SERVEPID=()

TSV="$RESULTS/results.tsv"
INFO="$RESULTS/info.tsv"
mkdir -p "$RESULTS/fio" "$RESULTS/logs"
: >"$TSV"
: >"$INFO"
put_info() { printf '%s\t%s\n' "$1" "$2" >>"$INFO"; }

# ---- setup ------------------------------------------------------------------

load_ublk
modprobe_mod loop || fail "cannot load the loop module"

put_info kernel "$KERNEL_VERSION"
put_info runtime "$RUNTIME"
put_info ramp "$RAMP"
put_info size_mib "$SIZE_MIB"
put_info queues "$QUEUES"
put_info depth "$DEPTH"
put_info rounds "$ROUNDS"
put_info cpus "$(nproc)"
put_info order "$ORDER"
put_info pin_queues "$([ "${#PIN[@]}" -gt 0 ] && echo yes || echo no)"
put_info fio "$(fio --version)"
put_info rublk "$("$RUBLK" --version 2>/dev/null | head -n 1 || echo unknown)"

# Zero copy as both servers use it: UBLK_F_AUTO_BUF_REG, asked from the driver.
"$RUBLK" features >"$RESULTS/logs/features.txt" 2>&1 || true
FEATURES="$(awk '/UBLK FEATURES/ { print $NF }' "$RESULTS/logs/features.txt")"
put_info features "${FEATURES:-unknown}"
if grep -qw AUTO_BUF_REG "$RESULTS/logs/features.txt"; then
    ZC=1
    put_info zero_copy yes
else
    ZC=0
    put_info zero_copy no
fi
info "kernel $KERNEL_VERSION, driver features ${FEATURES:-unknown}, zero copy: $([ "$ZC" = 1 ] && echo yes || echo no)"

# Backing files: a tmpfs of their own, as long as it takes O_DIRECT (Linux
# 6.6+); otherwise (or with --backing ext4) ext4 on a brd ramdisk. The same
# for every target. With --order jobs every device is live at once.
BACKDIR="$WORK/backing"
mkdir -p "$BACKDIR"
if [ "$ORDER" = jobs ]; then NLIVE=${#TARGETS[@]}; else NLIVE=1; fi
# room for the live backing files or volumes, with slack for volume metadata
BACK_MIB=$((NLIVE * (SIZE_MIB + SIZE_MIB / 8 + 16) + 64))
mem_mib="$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)"
if [ $((NLIVE * SIZE_MIB + 768)) -gt "$mem_mib" ]; then
    fail "$NLIVE backing files of $SIZE_MIB MiB do not fit in the guest's $mem_mib MiB (raise SNAPBLK_VM_MEMORY or lower --size)"
fi
put_info mem_mib "$mem_mib"

direct_ok() {
    local rc=0
    dd if=/dev/zero of="$BACKDIR/.odirect-probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null || rc=1
    rm -f "$BACKDIR/.odirect-probe"
    return "$rc"
}
BACK_MOUNTED=0
cleanup_backing() {
    [ "$BACK_MOUNTED" = 1 ] && { umount "$BACKDIR" 2>/dev/null || true; }
    [ -e /sys/module/brd ] && { modprobe -r -d "$MODTREE" brd 2>/dev/null || true; }
    return 0
}
trap 'teardown_all; cleanup_backing' EXIT

backing_fs=""
if [ "$BACKING" != ext4 ]; then
    mount -t tmpfs -o "size=${BACK_MIB}m,mode=0755" tmpfs "$BACKDIR" || fail "cannot mount a tmpfs on $BACKDIR"
    BACK_MOUNTED=1
    if direct_ok; then
        backing_fs=tmpfs
    else
        umount "$BACKDIR"
        BACK_MOUNTED=0
        [ "$BACKING" = tmpfs ] && fail "O_DIRECT does not work on tmpfs on this kernel (use --backing ext4)"
        info "O_DIRECT refused on tmpfs: using ext4 on a ramdisk"
    fi
fi
if [ -z "$backing_fs" ]; then
    modprobe_mod brd rd_nr=1 rd_size=$((BACK_MIB * 1024)) || fail "cannot load brd"
    wait_for_file /dev/ram0 10 || fail "/dev/ram0 did not appear"
    modprobe_mod ext4 || fail "cannot load ext4"
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/ram0 || fail "mkfs.ext4 /dev/ram0 failed"
    mount -t ext4 /dev/ram0 "$BACKDIR" || fail "cannot mount /dev/ram0"
    BACK_MOUNTED=1
    direct_ok || fail "O_DIRECT does not work on ext4 on /dev/ram0 either"
    backing_fs="ext4 on brd ramdisk"
fi
put_info backing "$backing_fs"
info "backing files: ${SIZE_MIB} MiB each on $backing_fs; order: $ORDER"

# ---- devices ----------------------------------------------------------------
# Per target T: DEV[T] is its block device, STATE[T] down|up|failed, REASON[T]
# why it failed. The *_up functions return 1 with REASON[T] set; every step
# in them is checked explicitly (they run where set -e does not apply).

# last_lines FILE [N]: the last N (3) lines of FILE on one line, for a reason.
last_lines() {
    local t
    t="$(tail -n "${2:-3}" "$1" 2>/dev/null | tr '\n\t' '  ')"
    printf '%s\n' "${t:-no output}"
}

# wait_gone PATH SECONDS
wait_gone() {
    local deadline=$(($(date +%s) + $2))
    while [ -e "$1" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# why T MESSAGE: set the reason target T failed; returns 1.
why() {
    REASON[$1]="$2"
    return 1
}

logdir() { printf '%s/logs/r%s-%s\n' "$RESULTS" "$ROUND" "$1"; }

loop_up() {
    local t="$1" file="$BACKDIR/$1.img" log dio dev
    log="$(logdir "$t")"
    truncate -s "${SIZE_MIB}M" "$file" || why "$t" "cannot create $file" || return 1
    dev="$(losetup --direct-io=on --show -f "$file" 2>"$log/losetup.err")" \
        || why "$t" "losetup --direct-io=on failed: $(last_lines "$log/losetup.err")" || return 1
    LOOPDEV[$t]="$dev"
    DEV[$t]="$dev"
    wait_for_file "$dev" 10 || why "$t" "$dev did not appear" || return 1
    dio="$(cat "/sys/block/${dev#/dev/}/loop/dio" 2>/dev/null || echo '?')"
    # losetup only warns when the kernel refuses direct I/O
    [ "$dio" = 1 ] || why "$t" "loop device has direct I/O off (dio=$dio) on $backing_fs: $(last_lines "$log/losetup.err")" || return 1
    NOTE[$t]="dio=1"
}
loop_down() {
    local t="$1"
    [ -n "${LOOPDEV[$t]:-}" ] && { losetup -d "${LOOPDEV[$t]}" || echo "warning: losetup -d ${LOOPDEV[$t]} failed" >&2; }
    LOOPDEV[$t]=""
    rm -f "$BACKDIR/$t.img"
}

# check_zc_flag T MODE FLAGS: the device's flags must match the mode asked for.
check_zc_flag() {
    local t="$1" mode="$2" flags="$3" has
    [ -n "$flags" ] || { NOTE[$t]="flags unknown"; return 0; }
    has=$(((flags >> 11) & 1)) # UBLK_F_AUTO_BUF_REG
    if [ "$mode" = zc ] && [ "$has" != 1 ]; then
        why "$t" "asked for zero copy, but the device's flags $flags lack UBLK_F_AUTO_BUF_REG"
        return 1
    fi
    if [ "$mode" = copy ] && [ "$has" = 1 ]; then
        why "$t" "asked for copy mode, but the device's flags $flags have UBLK_F_AUTO_BUF_REG"
        return 1
    fi
    NOTE[$t]="flags=$flags"
}

rublk_up() {
    local t="$1" mode="$2" file="$BACKDIR/$1.img" log id flags
    local -a zc=()
    log="$(logdir "$t")"
    [ "$mode" = zc ] && zc=(-z)
    truncate -s "${SIZE_MIB}M" "$file" || why "$t" "cannot create $file" || return 1
    # rublk forks its daemon and prints the new device's info ("dev id N: ...", "flags 0x...").
    "$RUBLK" add loop -f "$file" -q "$QUEUES" -d "$DEPTH" "${zc[@]}" >"$log/rublk-add.out" 2>&1 \
        || why "$t" "rublk add loop failed: $(last_lines "$log/rublk-add.out")" || return 1
    id="$(sed -nE 's/^dev id ([0-9]+):.*/\1/p' "$log/rublk-add.out" | head -n 1)"
    [ -n "$id" ] || why "$t" "cannot find the device id in rublk's output: $(last_lines "$log/rublk-add.out")" || return 1
    RUBLKID[$t]="$id"
    DEV[$t]="/dev/ublkb$id"
    wait_for_file "${DEV[$t]}" 10 || why "$t" "${DEV[$t]} did not appear" || return 1
    flags="$(sed -nE 's/.*flags (0x[0-9a-fA-F]+).*/\1/p' "$log/rublk-add.out" | head -n 1)"
    check_zc_flag "$t" "$mode" "$flags"
}
rublk_down() {
    local t="$1" id="${RUBLKID[$1]:-}" log
    log="$(logdir "$t")"
    if [ -n "$id" ]; then
        "$RUBLK" del -n "$id" >>"$log/rublk-del.out" 2>&1 \
            || echo "warning: rublk del -n $id failed: $(last_lines "$log/rublk-del.out" 1)" >&2
        wait_gone "/dev/ublkb$id" 20 || echo "warning: /dev/ublkb$id still there after rublk del" >&2
    fi
    RUBLKID[$t]=""
    rm -f "$BACKDIR/$t.img"
}

snapblk_up() {
    local t="$1" mode="$2" vol="$BACKDIR/$1.vol" log deadline flags dev="" pid
    local -a copy=()
    log="$(logdir "$t")"
    [ "$mode" = copy ] && copy=(--copy)
    "$SNAPBLK" volume create "$vol" --size "${SIZE_MIB}M" >"$log/volume-create.out" 2>&1 \
        || why "$t" "snapblk volume create failed: $(last_lines "$log/volume-create.out")" || return 1
    "$SNAPBLK" serve "$vol" --queues "$QUEUES" --depth "$DEPTH" "${copy[@]}" "${PIN[@]}" \
        >"$log/serve.out" 2>"$log/serve.log" &
    pid=$!
    SERVEPID[$t]="$pid"
    deadline=$(($(date +%s) + 60))
    while [ -z "$dev" ]; do
        dev="$(grep -o '/dev/ublkb[0-9]*' "$log/serve.out" 2>/dev/null | head -n 1)"
        [ -n "$dev" ] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            why "$t" "snapblk serve exited (status $?) before its device was live: $(last_lines "$log/serve.log")"
            SERVEPID[$t]=""
            return 1
        fi
        [ "$(date +%s)" -lt "$deadline" ] || why "$t" "snapblk serve printed no device after 60s" || return 1
        sleep 0.1
    done
    DEV[$t]="$dev"
    wait_for_file "$dev" 10 || why "$t" "$dev did not appear" || return 1
    flags="$(sed -nE 's/.*device added.* flags=(0x[0-9a-fA-F]+).*/\1/p' "$log/serve.log" | head -n 1)"
    check_zc_flag "$t" "$mode" "$flags"
}
snapblk_down() {
    local t="$1" pid="${SERVEPID[$1]:-}" rc=0
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" || rc=$?
        [ "$rc" = 0 ] || echo "warning: $t: snapblk serve exited with status $rc after SIGTERM" >&2
        [ -n "${DEV[$t]:-}" ] && { wait_gone "${DEV[$t]}" 20 || echo "warning: ${DEV[$t]} still there after snapblk serve stopped" >&2; }
    fi
    SERVEPID[$t]=""
    rm -rf "$BACKDIR/$t.vol"
}

# ---- fio ----------------------------------------------------------------------

FIO_COMMON=(--ioengine=io_uring --direct=1 --numjobs=1 --group_reporting)

# fio_error FILE: false (and FIO_ERR set) if fio's terse line reports an error.
fio_error() {
    FIO_ERR="$(awk -F';' '$1 == "3" { print $5; exit }' "$1")"
    [ "$FIO_ERR" = 0 ]
}

# prefill T: write the whole device once, so that reads hit data, not holes.
prefill() {
    local t="$1" out="$RESULTS/fio/r$ROUND-$1-prefill.txt" start
    start="$(date +%s)"
    timeout -k 10 1800 fio --name=prefill --filename="${DEV[$t]}" "${FIO_COMMON[@]}" \
        --rw=write --bs=1M --iodepth=16 --size=100% \
        --output-format=json,terse --terse-version=3 --output="$out" >/dev/null 2>"$out.err" \
        || why "$t" "prefill failed: $(last_lines "$out.err")" || return 1
    fio_error "$out" || why "$t" "prefill: fio reported error $FIO_ERR" || return 1
    info "  $t: prefill of ${SIZE_MIB} MiB in $(($(date +%s) - start)) s"
}

# target_up T: set up T's device and prefill it; on failure, tear it down.
target_up() {
    local t="$1" kind="${1%%-*}" mode="${1#*-}"
    mkdir -p "$(logdir "$t")"
    NOTE[$t]="" DEV[$t]=""
    if "${kind}_up" "$t" "$mode" && info "$t on ${DEV[$t]} (${NOTE[$t]})" && prefill "$t"; then
        STATE[$t]=up
        return 0
    fi
    target_failed "$t"
    return 1
}

target_down() {
    local t="$1"
    [ "${STATE[$t]:-down}" = up ] || [ "${STATE[$t]:-down}" = failing ] || return 0
    "${1%%-*}_down" "$t"
    [ "${STATE[$t]}" = up ] && STATE[$t]=down
    return 0
}

teardown_all() {
    local t
    for t in "${TARGETS[@]}"; do target_down "$t"; done
}

FAILED=0
# target_failed T: record T's failure (rows for the jobs it did not run this
# round, server log, kernel log) and tear its device down.
target_failed() {
    local t="$1" job reason="${REASON[$1]:-failed (see the output)}"
    FAILED=1
    reason="${reason//$'\t'/ }"
    for job in "${JOBS[@]}"; do
        job="${job%% *}"
        awk -F'\t' -v r="$ROUND" -v t="$t" -v j="$job" \
            '$1 == r && $2 == t && $3 == j { found = 1 } END { exit !found }' "$TSV" \
            || printf '%s\t%s\t%s\tfail\t\t\t%s\n' "$ROUND" "$t" "$job" "$reason" >>"$TSV"
    done
    echo "FAIL: $t: $reason"
    if [ "${t%%-*}" = snapblk ]; then
        tail -n 20 "$(logdir "$t")/serve.log" 2>/dev/null | sed 's/^/    serve: /' || true
    fi
    dmesg 2>/dev/null | tail -n 20 | sed 's/^/    dmesg: /' || true
    STATE[$t]=failing
    target_down "$t"
    STATE[$t]=failed
}

# daemon_pids T: the processes of T's server in user space (none for loop).
daemon_pids() {
    case "$1" in
        snapblk-*) echo "${SERVEPID[$1]:-}" ;;
        rublk-*) pgrep -f -- "$BACKDIR/$1.img" || true ;;
    esac
}

# cpu_ticks PID...: user + system clock ticks these processes (all their threads) used.
cpu_ticks() {
    local total=0 p v
    for p in "$@"; do
        v="$(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null)" || continue
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# run_job T NAME RW BS QD: one measured job on T; appends its row to results.tsv.
# Besides IOPS, the row has the server's CPU time per request in microseconds (user
# space servers only), over ramp and run alike.
run_job() {
    local t="$1" name="$2" rw="$3" bs="$4" qd="$5" out="$RESULTS/fio/r$ROUND-$1-$2.txt" row iops kib
    local -a pids
    local ticks0 ticks cpu_us=""
    read -r -a pids <<<"$(daemon_pids "$t" | tr '\n' ' ')"
    ticks0="$(cpu_ticks "${pids[@]}")"
    if ! timeout -k 10 $((RUNTIME + RAMP + 120)) fio --name="$name" --filename="${DEV[$t]}" "${FIO_COMMON[@]}" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --norandommap \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --output-format=json,terse --terse-version=3 --output="$out" >/dev/null 2>"$out.err"; then
        why "$t" "fio $name failed: $(last_lines "$out.err")"
        target_failed "$t"
        return 0
    fi
    if ! fio_error "$out"; then
        why "$t" "fio $name reported error $FIO_ERR"
        target_failed "$t"
        return 0
    fi
    # terse v3: read KiB/s and IOPS are fields 7 and 8, write 48 and 49
    row="$(awk -F';' -v rw="$rw" '$1 == "3" {
        if (rw ~ /read/) print $8, $7; else print $49, $48; exit }' "$out")"
    read -r iops kib <<<"$row"
    if ! [[ "$iops" =~ ^[0-9]+$ ]] || [ "$iops" = 0 ]; then
        why "$t" "fio $name: no IOPS in its output"
        target_failed "$t"
        return 0
    fi
    ticks=$(($(cpu_ticks "${pids[@]}") - ticks0))
    if [ "${#pids[@]}" -gt 0 ]; then
        cpu_us="$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v iops="$iops" -v secs=$((RUNTIME + RAMP)) \
            'BEGIN { printf "%.1f", t / hz * 1e6 / (iops * secs) }')"
    fi
    printf '%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\n' "$ROUND" "$t" "$name" "$iops" "$kib" "${NOTE[$t]}" "$cpu_us" >>"$TSV"
    info "  $t: $name: $iops IOPS, $((kib / 1024)) MiB/s${cpu_us:+, server CPU $cpu_us us per request}"
}

# ---- main ---------------------------------------------------------------------

for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    # every other round in reverse order
    order=()
    for t in "${TARGETS[@]}"; do
        if [ "${t#*-}" = zc ] && [ "$ZC" = 0 ]; then
            for job in "${JOBS[@]}"; do
                printf '%s\t%s\t%s\tskip\t\t\t%s\n' "$ROUND" "$t" "${job%% *}" "kernel lacks UBLK_F_AUTO_BUF_REG" >>"$TSV"
            done
            [ "$ROUND" = 1 ] && info "$t: skipped (kernel lacks UBLK_F_AUTO_BUF_REG)"
            continue
        fi
        STATE[$t]=down
        if [ $((ROUND % 2)) = 0 ]; then order=("$t" "${order[@]}"); else order+=("$t"); fi
    done
    info "round $ROUND/$ROUNDS: ${order[*]}"
    if [ "$ORDER" = jobs ]; then
        # every device live at once; each job runs on every device in turn,
        # starting one device further along for each job
        for t in "${order[@]}"; do target_up "$t" || true; done
        n=${#order[@]}
        for ((j = 0; j < ${#JOBS[@]}; j++)); do
            for ((k = 0; k < n; k++)); do
                t="${order[$(((j + k) % n))]}"
                [ "${STATE[$t]}" = up ] || continue
                # shellcheck disable=SC2086 # name, rw, bs, depth
                run_job "$t" ${JOBS[$j]}
            done
        done
        teardown_all
    else
        # one device at a time, removed before the next
        for t in "${order[@]}"; do
            target_up "$t" || continue
            for job in "${JOBS[@]}"; do
                [ "${STATE[$t]}" = up ] || break
                # shellcheck disable=SC2086 # name, rw, bs, depth
                run_job "$t" $job
            done
            target_down "$t"
        done
    fi
done

info "results in \$RESULTS/results.tsv"
exit "$FAILED"
}
