#!/bin/bash
# Soak: hours of churn, or minutes in CI. ext4 is mounted from the served device and fio
# writes and verifies (crc32c) a file on it in a loop, with fsync, for the whole run;
# meanwhile a driver, from a seeded random sequence, takes snapshots (the file system
# frozen by the daemon), exposes one (reads a few blocks, e2fsck of the frozen image,
# unexposes it), exports one (full, or incremental since the last exported snapshot),
# deletes one (its layer is merged into the one above) and kills the daemon with -9
# then takes the device over with `serve --recover` (fio's I/O waits meanwhile).
# Checks: no fio verify or I/O error; each chain of exports, imported into a new volume,
# equals the snapshots as they were exposed at export time (md5 of the whole device),
# and so does each exported snapshot still in the volume at the end (merges kept it
# intact); e2fsck of the volume at the end is clean; the daemon's open files and memory
# are flat after warm-up (see "memory and open files" below).
#
# Parameters (environment; vm-tests/run passes SNAPBLK_TEST_* through):
#   SNAPBLK_TEST_SOAK_SECONDS  length of the churn (default 80; the timeout below fits
#                              that, scripts/soak sets a longer one for longer runs)
#   SNAPBLK_TEST_SOAK_SEED     seed of the operation sequence (default: from the clock);
#                              printed, so that a run's sequence can be replayed
# timeout: 480
set -euo pipefail
. "$GUEST_LIB"

need_cmd fio mkfs.ext4 e2fsck md5sum python3 dd jq
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"

DURATION="${SNAPBLK_TEST_SOAK_SECONDS:-80}"
SEED="${SNAPBLK_TEST_SOAK_SEED:-$(($(date +%s) % 1000000))}"
[[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || fail "SNAPBLK_TEST_SOAK_SECONDS must be a number of seconds"
[[ "$SEED" =~ ^[0-9]+$ ]] || fail "SNAPBLK_TEST_SOAK_SEED must be a number"
info "soak: ${DURATION}s of churn, seed $SEED (replay with SNAPBLK_TEST_SOAK_SEED=$SEED)"

VOL="$WORK/vol"
SOCK="$WORK/vol.sock"
MNT="$WORK/mnt"
EXP="$WORK/exports"
IMP="$WORK/imported"
ISOCK="$WORK/imported.sock"
STOP="$WORK/fio.stop"
FIO_DIR="$RESULTS/fio"
FIO_LOOP_PID=""
MAX_SNAPS=8
MAX_CHAIN=4
mkdir -p "$MNT" "$EXP" "$FIO_DIR"

# On failure, never leave a mounted file system on a device without a daemon (its I/O
# would wait forever): bring a daemon back if needed, stop fio, unmount.
cleanup() {
    local rc=$?
    trap - EXIT
    set +e
    if [ "$rc" != 0 ]; then
        : >"$STOP"
        if grep -q " $MNT " /proc/self/mounts; then
            if ! kill -0 "${MAIN_PID:-0}" 2>/dev/null; then
                "$SNAPBLK" serve "$VOL" --recover --socket "$SOCK" >/dev/null 2>"$RESULTS/serve-cleanup.log" &
                MAIN_PID=$!
                sleep 5
            fi
            "$SNAPBLK" thaw -V "$VOL" --socket "$SOCK" >/dev/null 2>&1
            [ -n "$FIO_LOOP_PID" ] && pkill -9 -P "$FIO_LOOP_PID" fio 2>/dev/null
            sleep 1
            umount "$MNT"
        fi
        [ -n "${MAIN_PID:-}" ] && kill -TERM "$MAIN_PID" 2>/dev/null
        [ -n "${IMP_PID:-}" ] && kill -TERM "$IMP_PID" 2>/dev/null
    fi
    exit "$rc"
}
trap cleanup EXIT

# The operation sequence: RANDOM of this shell only (never read in a subshell), seeded.
RANDOM="$SEED"
# rnd N: R = a random number in [0, N).
rnd() { R=$(((RANDOM * 32768 + RANDOM) % $1)); }
now() { date +%s; }
num() { printf '%s\n' "${1#s}"; }

"$SNAPBLK" volume create "$VOL" --size 128M >/dev/null
INCARNATION=1
start_serve "$VOL" serve-1 --socket "$SOCK"
MAIN_PID=$SERVE_PID MAIN_DEV=$DEV
mkfs.ext4 -q -F "$MAIN_DEV"
mount -t ext4 "$MAIN_DEV" "$MNT"

# ---- memory and open files -----------------------------------------------------------
# Sampled between operations, when no control connection or exposed device is open:
# VmRSS and RssAnon (its heap and stacks; VmRSS also counts the mapped /dev/shm journal
# and the binary's pages) and the number of open fds, which follows the number of
# layers (each layer's files stay open) and the merges under way. So the two samples
# that are compared are taken in the same state: all snapshots deleted, one taken, its
# merges finished (settle below). Each kill starts a new process and the figures start
# again: kills happen in the first half of the run only, and the last incarnation is
# judged from its warm-up sample (at 60% of the run, once it has served operations for a
# while) to its end: 40% of the run.
SAMPLES="$RESULTS/daemon-samples.tsv"
printf 'seconds\tincarnation\tpid\tVmRSS_kB\tRssAnon_kB\tfds\tsnapshots\top\n' >"$SAMPLES"
sample() {
    local k v rest
    S_RSS=0 S_ANON=0
    while read -r k v rest; do
        case "$k" in
            VmRSS:) S_RSS=$v ;;
            RssAnon:) S_ANON=$v ;;
        esac
    done <"/proc/$MAIN_PID/status"
    S_FDS=$(find "/proc/$MAIN_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(($(now) - T0))" "$INCARNATION" "$MAIN_PID" \
        "$S_RSS" "$S_ANON" "$S_FDS" "${#SNAPS[@]}" "$1" >>"$SAMPLES"
}

# ---- fio, for the whole run ----------------------------------------------------------
# Rate limited so that the driver's commands get CPU too; each pass writes 32 MiB at
# random (fsync every 32 writes), then reads it all back and checks it.
fio_loop() {
    local n=0 rc
    while [ ! -e "$STOP" ]; do
        n=$((n + 1))
        rc=0
        fio --name=soak --directory="$MNT" --filename=soak.dat --size=32M \
            --thread --ioengine=io_uring --direct=1 --iodepth=8 --rw=randwrite \
            --bssplit=4k/50:16k/25:64k/25 --rate_iops=,250 --fsync=32 --randseed=$((SEED + n)) \
            --verify=crc32c --do_verify=1 --verify_fatal=1 \
            --output-format=json --output="$FIO_DIR/pass-$n.json" 2>"$FIO_DIR/pass-$n.err" || rc=$?
        printf '%s\t%s\n' "$n" "$rc" >>"$FIO_DIR/status"
    done
}
: >"$FIO_DIR/status"
(
    set +e
    fio_loop
) </dev/null >/dev/null 2>&1 &
FIO_LOOP_PID=$!

# ---- the driver ----------------------------------------------------------------------
SNAPS=()         # snapshots in the volume, oldest first
declare -A CK=() # md5 of each exported snapshot, taken from its exposed device
CHAIN_FILES=() CHAIN_SNAPS=()
LAST_EXPORTED="" CHAINS=0 CHAINS_OK=0 NEXT=0
declare -A OPS=([settle]=0 [create]=0 [expose]=0 [export-full]=0 [export-incremental]=0 [delete]=0 [kill-recover]=0)
OP_OUT="$WORK/op.out"

run_op() { # run_op WHAT CMD...: the command must succeed
    local what="$1"
    shift
    "$@" >"$OP_OUT" 2>"$OP_OUT.err" || fail "$what: $(tail -5 "$OP_OUT.err") $(tail -5 "$OP_OUT")"
}
has_snap() {
    local s
    for s in "${SNAPS[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}
drop_snap() {
    local s keep=()
    for s in "${SNAPS[@]}"; do [ "$s" = "$1" ] || keep+=("$s"); done
    SNAPS=("${keep[@]}")
}
pick_snap() { rnd "${#SNAPS[@]}"; PICK="${SNAPS[$R]}"; }

# expose_md5 VOLUME SOCKET SNAP: MD5 of the snapshot, read whole from its exposed device.
expose_md5() {
    local dev
    run_op "expose $3 of $1" "$SNAPBLK" snapshot expose "$3" -V "$1" --socket "$2" -o json
    dev="$(json '.device' <"$OP_OUT")"
    wait_for_file "$dev" 10 || fail "$dev did not appear"
    MD5="$(md5sum <"$dev" | cut -d' ' -f1)"
    run_op "unexpose $3 of $1" "$SNAPBLK" snapshot unexpose "$3" -V "$1" --socket "$2"
}

op_create() {
    NEXT=$((NEXT + 1))
    run_op "snapshot create s$NEXT" "$SNAPBLK" snapshot create "s$NEXT" -V "$VOL" --socket "$SOCK" -o json
    grep -q '"created": true' "$OP_OUT" || fail "snapshot create s$NEXT: $(cat "$OP_OUT")"
    SNAPS+=("s$NEXT")
    OPS[create]=$((OPS[create] + 1))
}

op_expose() {
    local dev blocks i
    pick_snap
    run_op "expose $PICK" "$SNAPBLK" snapshot expose "$PICK" -V "$VOL" --socket "$SOCK" -o json
    dev="$(json '.device' <"$OP_OUT")"
    wait_for_file "$dev" 10 || fail "$dev did not appear"
    blocks=$((128 * 256))
    for i in 1 2 3 4 5 6 7 8; do
        rnd "$blocks"
        dd if="$dev" of=/dev/null bs=4k count=1 skip="$R" iflag=direct status=none ||
            fail "reading block $R of exposed $PICK"
    done
    e2fsck -fn "$dev" >"$RESULTS/e2fsck-snapshot.txt" 2>&1 ||
        fail "e2fsck of snapshot $PICK: $(tail -5 "$RESULTS/e2fsck-snapshot.txt")"
    run_op "unexpose $PICK" "$SNAPBLK" snapshot unexpose "$PICK" -V "$VOL" --socket "$SOCK"
    OPS[expose]=$((OPS[expose] + 1))
}

# verify_chain: import the current chain of exports into a new volume, serve it, and
# compare each of its snapshots with the MD5 the source's had at export time.
verify_chain() {
    local s keep_pid="$SERVE_PID" keep_dev="$DEV"
    [ "${#CHAIN_FILES[@]}" -gt 0 ] || return 0
    rm -rf "$IMP"
    run_op "import of chain $CHAINS (${CHAIN_SNAPS[*]})" "$SNAPBLK" import "$IMP" "${CHAIN_FILES[@]}"
    start_serve "$IMP" "serve-imported-$CHAINS" --socket "$ISOCK"
    IMP_PID=$SERVE_PID
    for s in "${CHAIN_SNAPS[@]}"; do
        expose_md5 "$IMP" "$ISOCK" "$s"
        [ "$MD5" = "${CK[$s]}" ] || fail "chain $CHAINS: imported $s ($MD5) differs from the source's at export (${CK[$s]})"
    done
    stop_serve
    IMP_PID=""
    SERVE_PID=$keep_pid DEV=$keep_dev
    rm -rf "$IMP" "${CHAIN_FILES[@]}"
    info "chain $CHAINS imported and equal: ${CHAIN_SNAPS[*]}"
    CHAINS_OK=$((CHAINS_OK + 1))
    CHAIN_FILES=() CHAIN_SNAPS=()
}

op_export() {
    local target base="" newer=() s file
    if [ -n "$LAST_EXPORTED" ] && has_snap "$LAST_EXPORTED" && [ "${#CHAIN_FILES[@]}" -lt "$MAX_CHAIN" ]; then
        for s in "${SNAPS[@]}"; do
            [ "$(num "$s")" -gt "$(num "$LAST_EXPORTED")" ] && newer+=("$s")
        done
        rnd 4
        if [ "${#newer[@]}" -gt 0 ] && [ "$R" != 0 ]; then
            base="$LAST_EXPORTED"
            rnd "${#newer[@]}"
            target="${newer[$R]}"
        fi
    fi
    if [ -z "$base" ]; then
        verify_chain
        CHAINS=$((CHAINS + 1))
        pick_snap
        target="$PICK"
    fi
    file="$EXP/c$CHAINS-$((${#CHAIN_FILES[@]} + 1))-$target.snapblk"
    if [ -n "$base" ]; then
        run_op "export $target --since $base" "$SNAPBLK" export "$VOL" "$target" --since "$base" --socket "$SOCK" -o "$file"
        OPS[export-incremental]=$((OPS[export-incremental] + 1))
    else
        run_op "export $target" "$SNAPBLK" export "$VOL" "$target" --socket "$SOCK" -o "$file"
        OPS[export-full]=$((OPS[export-full] + 1))
    fi
    expose_md5 "$VOL" "$SOCK" "$target"
    CK[$target]="$MD5"
    CHAIN_FILES+=("$file") CHAIN_SNAPS+=("$target")
    LAST_EXPORTED="$target"
}

op_delete() {
    pick_snap
    op_delete_pick
}
op_delete_pick() {
    run_op "snapshot delete $PICK" "$SNAPBLK" snapshot delete "$PICK" -V "$VOL" --socket "$SOCK"
    drop_snap "$PICK"
    OPS[delete]=$((OPS[delete] + 1))
}

op_kill() {
    kill -9 "$MAIN_PID"
    wait "$MAIN_PID" 2>/dev/null || true
    [ -e "$MAIN_DEV" ] || fail "$MAIN_DEV vanished when its daemon was killed"
    INCARNATION=$((INCARNATION + 1))
    start_serve "$VOL" "serve-$INCARNATION" --recover --socket "$SOCK"
    [ "$DEV" = "$MAIN_DEV" ] || fail "recovered as $DEV, not $MAIN_DEV"
    grep -q 'reattached' "$RESULTS/serve-$INCARNATION.log" || fail "daemon $INCARNATION did not reattach"
    MAIN_PID=$SERVE_PID
    OPS[kill-recover]=$((OPS[kill-recover] + 1))
}

# settle: bring the volume to the same state each time: delete every snapshot, take two
# and delete the first (so that every deleted layer is merged, whichever way merges and
# cuts are ordered), wait for the merges to finish; LAYERS = the layers then.
settle() {
    local deadline=$(($(now) + 120)) pending
    while [ "${#SNAPS[@]}" -gt 0 ]; do
        PICK="${SNAPS[0]}" op_delete_pick
    done
    op_create
    op_create
    PICK="${SNAPS[0]}" op_delete_pick
    OPS[settle]=$((OPS[settle] + 1))
    while :; do
        run_op status "$SNAPBLK" status -V "$VOL" --socket "$SOCK" -o json
        pending="$(json '.volume.pending_merges' <"$OP_OUT")"
        [ "$pending" = 0 ] && break
        [ "$(now)" -lt "$deadline" ] || fail "$pending merges still pending 120s after the deletes"
        sleep 1
    done
    LAYERS="$(json '.volume.layers' <"$OP_OUT")"
    # Where the kernel offers no zero copy, the daemon has a buffer per request slot
    # (queues x depth x the largest request), whose pages become resident as the slots
    # are first used: one 128 MiB pool, not a leak. A burst of large reads that fills
    # every slot of every queue makes it all resident before each sample, so the two
    # samples compare the same pool.
    fio --name=fill-slots --filename="$MAIN_DEV" --readonly --direct=1 --ioengine=io_uring \
        --rw=randread --bs=512k --iodepth=128 --numjobs=2 --cpus_allowed=0-1 \
        --cpus_allowed_policy=split --thread --time_based --runtime=3 \
        >"$RESULTS/fill-slots.txt" 2>&1 || fail "reading the device: $(tail -5 "$RESULTS/fill-slots.txt")"
}

T0=$(now)
T_END=$((T0 + DURATION))
KILL_BY=$((T0 + DURATION / 4))
KILLS_UNTIL=$((T0 + DURATION * 5 / 10))
WARM_AT=$((T0 + DURATION * 6 / 10))
sample start
START_RSS=$S_RSS START_ANON=$S_ANON START_FDS=$S_FDS
WARM_RSS="" WARM_ANON="" WARM_FDS="" WARM_T=0
MAX_ANON=0 N=0
while [ "$(now)" -lt "$T_END" ]; do
    N=$((N + 1))
    # weights: create 25, expose 15, export 20, delete 25, kill 15 (first half only, and
    # at least one, by a quarter of the run)
    rnd 100
    if [ "$R" -lt 25 ]; then op=create
    elif [ "$R" -lt 40 ]; then op=expose
    elif [ "$R" -lt 60 ]; then op=export
    elif [ "$R" -lt 85 ]; then op=delete
    else op=kill
    fi
    [ "${OPS[kill-recover]}" = 0 ] && [ "$(now)" -ge "$KILL_BY" ] && op=kill
    [ "$op" = kill ] && [ "$(now)" -ge "$KILLS_UNTIL" ] && op=create
    [ "${#SNAPS[@]}" = 0 ] && op=create
    [ "${#SNAPS[@]}" -ge "$MAX_SNAPS" ] && [ "$op" = create ] && op=delete
    "op_$op"
    kill -0 "$FIO_LOOP_PID" 2>/dev/null || fail "the fio loop ended"
    if awk -F'\t' '$2 != 0 { bad = 1 } END { exit !bad }' "$FIO_DIR/status"; then
        fail "a fio pass failed: $(cat "$FIO_DIR"/pass-*.err | tail -5)"
    fi
    sample "$N-$op"
    if [ -z "$WARM_RSS" ] && [ "$(now)" -ge "$WARM_AT" ]; then
        settle
        sample warm
        cp "/proc/$MAIN_PID/smaps" "$RESULTS/smaps-warm.txt" 2>/dev/null || true
        WARM_RSS=$S_RSS WARM_ANON=$S_ANON WARM_FDS=$S_FDS WARM_T=$(($(now) - T0))
        WARM_INC=$INCARNATION WARM_LAYERS=$LAYERS
    fi
    [ -n "$WARM_RSS" ] && [ "$S_ANON" -gt "$MAX_ANON" ] && MAX_ANON=$S_ANON
done
CHURN=$(($(now) - T0))
[ -n "$WARM_RSS" ] || fail "no sample after warm-up: the run is too short"
# Exported snapshots still in the volume read as they did at export, whatever was merged
# into or out of their layers since.
checked=0
for s in "${SNAPS[@]}"; do
    [ -n "${CK[$s]:-}" ] || continue
    expose_md5 "$VOL" "$SOCK" "$s"
    [ "$MD5" = "${CK[$s]}" ] || fail "snapshot $s changed since its export ($MD5, was ${CK[$s]})"
    checked=$((checked + 1))
done
info "$checked exported snapshots still in the volume read as at their export"
settle
sample end
cp "/proc/$MAIN_PID/smaps" "$RESULTS/smaps-end.txt" 2>/dev/null || true
END_RSS=$S_RSS END_ANON=$S_ANON END_FDS=$S_FDS
[ "$WARM_INC" = "$INCARNATION" ] || fail "the daemon was restarted after warm-up"
info "churn done after ${CHURN}s, $N operations; stopping fio after its current pass"

: >"$STOP"
wait "$FIO_LOOP_PID" || true
FIO_LOOP_PID=""

verify_chain

umount "$MNT"
e2fsck -fn "$MAIN_DEV" >"$RESULTS/e2fsck.txt" 2>&1 || fail "e2fsck of the volume: $(tail -5 "$RESULTS/e2fsck.txt")"
SERVE_PID=$MAIN_PID DEV=$MAIN_DEV
stop_serve
MAIN_PID=""

# ---- figures -------------------------------------------------------------------------
python3 - "$FIO_DIR" >"$WORK/fio-figures" <<'PY'
import glob, json, os, sys
d = sys.argv[1]
passes = failed = verify = written = read = 0
for line in open(os.path.join(d, "status")):
    n, rc = line.split()
    passes += 1
    failed += rc != "0"
    err = open(os.path.join(d, "pass-%s.err" % n), errors="replace").read()
    verify += sum(1 for l in err.splitlines() if "verify" in l and ("bad" in l or "fail" in l))
    text = open(os.path.join(d, "pass-%s.json" % n), errors="replace").read()
    if "{" not in text:
        continue
    try:
        doc = json.loads(text[text.index("{"):])
    except ValueError:
        continue
    for job in doc.get("jobs", []):
        written += job["write"]["io_bytes"]
        read += job["read"]["io_bytes"]
print(passes, failed, verify, written, read)
PY
read -r passes failed verify_errors written read_back <"$WORK/fio-figures"
kinds=""
for k in settle create expose export-full export-incremental delete kill-recover; do kinds="$kinds $k=${OPS[$k]}"; done
cat <<EOF | tee "$RESULTS/summary.txt"
soak summary (seed $SEED, kernel $KERNEL_VERSION)
  churn:            ${CHURN}s ($((CHURN / 60)) min $((CHURN % 60)) s), $N operations:$kinds
  chains verified:  $CHAINS_OK (every export imported and equal to its snapshot), exported snapshots rechecked at the end: $checked
  fio:              $passes passes, $failed failed, $verify_errors verify errors, $((written / 1048576)) MiB written, $((read_back / 1048576)) MiB read back
  daemon start:     VmRSS ${START_RSS} kB, RssAnon ${START_ANON} kB, ${START_FDS} fds (incarnation 1, before any operation)
  daemon warm:      VmRSS ${WARM_RSS} kB, RssAnon ${WARM_ANON} kB, ${WARM_FDS} fds, $WARM_LAYERS layers (incarnation $INCARNATION at ${WARM_T}s, settled)
  daemon end:       VmRSS ${END_RSS} kB, RssAnon ${END_ANON} kB, ${END_FDS} fds, $LAYERS layers (incarnation $INCARNATION, settled; peak RssAnon after warm-up ${MAX_ANON} kB)
EOF
[ "$failed" = 0 ] && [ "$verify_errors" = 0 ] || fail "fio: $failed failed passes, $verify_errors verify errors"
[ "$passes" -ge 2 ] || fail "fio ran only $passes passes: nothing was soaked"
[ "$LAYERS" = "$WARM_LAYERS" ] || fail "settled with $WARM_LAYERS layers at warm-up but $LAYERS at the end"
[ "$END_FDS" -le "$WARM_FDS" ] || fail "the daemon's open files grew from $WARM_FDS to $END_FDS after warm-up"
# RssAnon may move by what the allocator keeps cached (serve fixes glibc's mmap threshold,
# so large buffers are returned, but small blocks stay in its arenas): 8 MiB of slack; a
# leak of a few kB per operation over a long run goes past it, a CI run is too short to
# tell a small leak from that noise.
if [ "$END_ANON" -gt $((WARM_ANON + 8192)) ]; then
    # Where it grew: anonymous kB per mapping (by address) at warm-up and at the end.
    python3 - "$RESULTS/smaps-warm.txt" "$RESULTS/smaps-end.txt" <<'PY' || true
import re, sys
def anon(path):
    out, cur = {}, None
    for line in open(path):
        f = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            # Keyed by start address: a mapping that grew keeps it.
            cur = f[0].split("-")[0] + " " + (f[5] if len(f) > 5 else "[anon]")
            out[cur] = 0
        elif line.startswith("Anonymous:"):
            out[cur] = int(line.split()[1])
    return out
warm, end = anon(sys.argv[1]), anon(sys.argv[2])
grown = sorted(((end[k] - warm.get(k, 0), k) for k in end), reverse=True)[:8]
for kb, k in grown:
    print("--- grown by %d kB: %s%s" % (kb, k, "" if k in warm else " (new since warm-up)"))
PY
    fail "the daemon's anonymous memory grew from $WARM_ANON kB to $END_ANON kB after warm-up"
fi
info "ok"
