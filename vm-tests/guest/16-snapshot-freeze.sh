#!/bin/bash
# Application-consistent snapshots through the control socket: with ext4 mounted and a
# writer running, snapshots freeze the file system for the cut and report how long the
# writers were held (from the start of FIFREEZE to the thaw, at least the frozen time); a
# file system frozen by someone else is refused; the daemon killed while holding a freeze
# gets thawed by the watchdog (ext4's thaw writes its superblock, so it completes once
# the restarted daemon serves the device again) within the deadline plus a second, and
# the restarted daemon lists the same snapshots; a snapshot cloned into a new volume
# mounts without journal recovery, passes e2fsck, and holds the files checksummed before it.
# Also prints the stall figures under a database-like writer (appends with fsync plus
# dirty page cache), against the same run's bare freeze (the same syncs, FIFREEZE, FITHAW
# at once, no snapshot: what any freeze-based snapshot pays) with and without the writer,
# and the writer's own longest call during each snapshot, each bare freeze and between.
# timeout: 900
set -euo pipefail
. "$GUEST_LIB"

need_cmd mkfs.ext4 e2fsck fsfreeze sha256sum python3 jq
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"

MNT="$WORK/mnt"
SOCK="$WORK/vol.sock"
WRITER_PID=""
cleanup() {
    [ -n "$WRITER_PID" ] && kill "$WRITER_PID" 2>/dev/null || true
    fsfreeze -u "$MNT" 2>/dev/null || true
    umount "$MNT" 2>/dev/null || true
    umount "$WORK/cmnt" 2>/dev/null || true
}
trap cleanup EXIT

"$SNAPBLK" volume create "$WORK/vol" --size 256M
start_serve "$WORK/vol" serve-1 --socket "$SOCK"
mkfs.ext4 -q -F "$DEV"
mkdir -p "$MNT"
mount "$DEV" "$MNT"
for i in $(seq 1 8); do head -c 512K /dev/urandom >"$MNT/before-$i"; done
sync
( cd "$MNT" && sha256sum before-* ) >"$WORK/sums-before"

info "snapshot without load"
"$SNAPBLK" snapshot create s0 -V vol --socket "$SOCK" -o json >"$WORK/s0.json"
[ "$(json '.created' <"$WORK/s0.json")" = true ] || fail "s0 not created: $(cat "$WORK/s0.json")"
json '.consistency' <"$WORK/s0.json" | grep -q '^application-consistent' || fail "s0 not frozen: $(cat "$WORK/s0.json")"
json '.frozen_mounts[0]' <"$WORK/s0.json" | grep -qx "$MNT" || fail "s0 froze the wrong mount"
"$SNAPBLK" snapshot create s0 -V vol --socket "$SOCK" -o json | json '.created' | grep -qx false || fail "same name twice is not idempotent"

info "20 snapshots under a continuous writer"
start_writer "$MNT" 200 20
: >"$WORK/frozen_ms"
for n in $(seq 1 20); do
    "$SNAPBLK" snapshot create "load-$n" -V vol --socket "$SOCK" -o json >"$WORK/load.json" ||
        fail "snapshot load-$n failed: $(cat "$WORK/load.json")"
    json '"\(.frozen_ms) \(.cut_ms) \(.stall_ms) \(.sync_ms)"' <"$WORK/load.json" >>"$WORK/frozen_ms"
    touch "$MNT/writable-$n" || fail "file system not writable after snapshot load-$n"
done
kill "$WRITER_PID"; wait "$WRITER_PID" 2>/dev/null || true; WRITER_PID=""
awk '$3 < $1 { bad = 1 } END { exit bad }' "$WORK/frozen_ms" || fail "a stall shorter than the frozen time was reported: $(cat "$WORK/frozen_ms")"
sort -n "$WORK/frozen_ms" | awk '{f[NR]=$1; c[NR]=$2} END {printf "frozen ms: median %.2f max %.2f; cut ms: median %.2f\n", f[int((NR+1)/2)], f[NR], c[int((NR+1)/2)]}' | tee "$RESULTS/freeze-figures.txt"
sort -k3,3n "$WORK/frozen_ms" | awk '{s[NR]=$3; y+=$4} END {printf "writers held (FIFREEZE to thaw) ms: median %.2f max %.2f; syncfs before the freeze ms: mean %.2f\n", s[int((NR+1)/2)], s[NR], y/NR}' | tee -a "$RESULTS/freeze-figures.txt"

# The baseline of the stall figures: syncfs while each pass is quicker than the one before
# (as the daemon does), then FIFREEZE and FITHAW at once; prints the milliseconds from the
# start of FIFREEZE to the end of FITHAW (the writers' hold without a snapshot), then those
# of FIFREEZE and of FITHAW.
cat >"$WORK/bare-freeze.py" <<'EOF'
import ctypes, fcntl, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDONLY)
def syncfs():
    t = time.monotonic()
    libc.syncfs(fd)
    return time.monotonic() - t
last = syncfs()
for _ in range(3):
    took = syncfs()
    if took < 0.005 or took >= last:
        break
    last = took
t0 = time.monotonic()
fcntl.ioctl(fd, 0xC0045877, struct.pack("i", 0))
t1 = time.monotonic()
fcntl.ioctl(fd, 0xC0045878, struct.pack("i", 0))
t2 = time.monotonic()
print("%.3f %.3f %.3f" % ((t2 - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3))
EOF
: >"$WORK/bare-idle"
for _ in $(seq 1 10); do
    python3 "$WORK/bare-freeze.py" "$MNT" >>"$WORK/bare-idle" || fail "a bare freeze of the idle file system failed"
    sleep 0.2
done

info "10 snapshots under a database-like writer (appends with fsync, dirty page cache)"
# A journal of 4 KiB appends each followed by fsync, and buffered random 4 KiB writes to
# a table file that only the page cache holds. Prints the stall figures (median, max)
# and the longest fsync the writer saw, and each snapshot's stall as the writer itself
# measured it; fails only on clearly broken behaviour, never on a figure.
python3 - "$MNT" "$WORK/db-writer" "$WORK/db-waits" <<'EOF' &
import os, random, signal, sys, time
mnt, out, waits_out = sys.argv[1], sys.argv[2], sys.argv[3]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
wal = os.open(os.path.join(mnt, "db-wal"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
table = os.open(os.path.join(mnt, "db-table"), os.O_RDWR | os.O_CREAT, 0o600)
page = os.urandom(4096)
n, worst = 0, 0.0
# Every call that took over a millisecond, as (start, end) on the wall clock that the
# shell's `date` reads: the windows of the snapshots are matched against them.
waits = []
def timed(call, *args):
    t = time.time()
    call(*args)
    e = time.time()
    if e - t > 0.001:
        waits.append((t, e))
    return e - t
while not stop:
    timed(os.write, wal, page)
    worst = max(worst, timed(os.fsync, wal))
    n += 1
    for _ in range(2):
        timed(os.pwrite, table, page, random.randrange(4096) * 4096)
with open(out, "w") as f:
    f.write("%d %.3f\n" % (n, worst * 1e3))
with open(waits_out, "w") as f:
    for t, e in waits:
        f.write("%.6f %.6f\n" % (t, e))
EOF
DB_PID=$!
sleep 1
# Snapshots and bare freezes alternate, so that both meet the same writer and host.
: >"$WORK/bare-db"
# Each one's wall-clock window goes to windows, to find the writer's calls it held.
: >"$WORK/windows"
for n in $(seq 1 10); do
    t0=$(date +%s.%N)
    "$SNAPBLK" snapshot create "db-$n" -V vol --socket "$SOCK" -o json >"$WORK/db-$n.json" ||
        fail "snapshot db-$n failed: $(cat "$WORK/db-$n.json")"
    echo "snapshot $t0 $(date +%s.%N)" >>"$WORK/windows"
    sleep 0.2
    t0=$(date +%s.%N)
    python3 "$WORK/bare-freeze.py" "$MNT" >>"$WORK/bare-db" || fail "a bare freeze under the writer failed"
    echo "bare $t0 $(date +%s.%N)" >>"$WORK/windows"
    sleep 0.2
done
kill "$DB_PID"; wait "$DB_PID" || fail "the database-like writer failed"
read -r db_ops db_worst <"$WORK/db-writer"
[ "$db_ops" -gt 0 ] || fail "the database-like writer made no progress"
python3 - "$WORK" "$db_ops" "$db_worst" <<'EOF' >"$WORK/db-figures" 2>&1 || fail "$(tail -n 1 "$WORK/db-figures")"
import json, statistics, sys
work, ops, worst = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
runs = [json.load(open("%s/db-%d.json" % (work, n))) for n in range(1, 11)]
stall = sorted(r["stall_ms"] for r in runs)
mean = lambda k: statistics.mean(r.get(k, 0) for r in runs)
print("database-like writer: stall ms median %.2f max %.2f; mean ms: syncfs %.2f freeze %.2f "
      "frozen %.2f cut %.2f (prepare %.2f switch %.2f seal %.2f); %d fsyncs, longest %.2f ms"
      % (statistics.median(stall), stall[-1], mean("sync_ms"), mean("freeze_ms"), mean("frozen_ms"),
         mean("cut_ms"), mean("prepare_ms"), mean("switch_ms"), mean("seal_ms"), ops, worst))
bare_runs = [[float(x) for x in l.split()] for l in open("%s/bare-db" % work)]
bare = sorted(r[0] for r in bare_runs)
idle = [float(l.split()[0]) for l in open("%s/bare-idle" % work)]
med = lambda rows, i: statistics.median(r[i] for r in rows)
print("bare freeze (same syncs, FIFREEZE then FITHAW, no snapshot) ms: under the writer median %.2f "
      "max %.2f (FIFREEZE %.2f, FITHAW %.2f), idle median %.2f; snapshot's medians: FIFREEZE %.2f, "
      "frozen %.2f; stall/bare ratio of medians %.2f"
      % (statistics.median(bare), bare[-1], med(bare_runs, 1), med(bare_runs, 2),
         statistics.median(idle), statistics.median(r["freeze_ms"] for r in runs),
         statistics.median(r["frozen_ms"] for r in runs),
         statistics.median(stall) / statistics.median(bare)))
# What the application itself saw: for each snapshot (and each bare freeze), its longest
# call (write, fsync or page-cache write) that overlapped the window of the command. It
# counts from when the call really blocked, not from the start of FIFREEZE, and includes
# the call's own time (an fsync takes a few ms on its own).
waits = [tuple(map(float, l.split())) for l in open("%s/db-waits" % work)]
windows = [(k, float(a), float(b)) for k, a, b in (l.split() for l in open("%s/windows" % work))]
def longest(a, b, within):
    """The writer's longest call (ms) overlapping [a, b], or only those inside it."""
    return max([(e - t) * 1e3 for t, e in waits
                if (a <= t and e <= b if within else t < b and e > a)] or [0.0])
seen = sorted(longest(a, b, False) for k, a, b in windows if k == "snapshot")
seen_bare = sorted(longest(a, b, False) for k, a, b in windows if k == "bare")
took = sorted((b - a) * 1e3 for k, a, b in windows if k == "snapshot")
# And between them (the 0.2 s pauses): the writer's longest call when nothing freezes.
marks = sorted((a, b) for _, a, b in windows)
quiet = sorted(longest(b0, a1, True) for (_, b0), (a1, _) in zip(marks, marks[1:]))
print("the writer's longest call during each snapshot ms: median %.2f max %.2f; during each "
      "bare freeze: median %.2f max %.2f; ratio of medians %.2f; in the pauses between them: "
      "median %.2f" % (statistics.median(seen), seen[-1], statistics.median(seen_bare),
                       seen_bare[-1], statistics.median(seen) / max(statistics.median(seen_bare), 0.001),
                       statistics.median(quiet)))
print("snapshot create, the whole command, ms: median %.2f max %.2f" % (statistics.median(took), took[-1]))
if stall[-1] > 5000:
    sys.exit("a snapshot held the writers for over 5 s: %s" % stall)
EOF
tee -a "$RESULTS/freeze-figures.txt" <"$WORK/db-figures"

info "refusals"
fsfreeze -f "$MNT"
if out=$("$SNAPBLK" snapshot create refused -V vol --socket "$SOCK" 2>&1); then
    fsfreeze -u "$MNT"; fail "a snapshot was taken of a file system frozen by someone else"
fi
fsfreeze -u "$MNT"
echo "$out" | grep -q "already frozen by someone else" || fail "unclear refusal: $out"
out=$("$SNAPBLK" snapshot create "bad/name" -V vol --socket "$SOCK" 2>&1) && fail "bad name accepted"
echo "$out" | grep -q "snapshot name" || fail "unclear refusal: $out"
out=$("$SNAPBLK" snapshot create other -V vol --socket "$SOCK" --mount /proc 2>&1) && fail "foreign mount accepted"
echo "$out" | grep -q "not mounted from this volume" || fail "unclear refusal: $out"
"$SNAPBLK" snapshot create crash-only -V vol --socket "$SOCK" --freeze none | grep "crash-consistent" >/dev/null ||
    fail "--freeze none did not say crash-consistent"

info "kill -9 while the file system is frozen"
mkfifo "$WORK/hold"
"$SNAPBLK" freeze -V vol --socket "$SOCK" --timeout 20s <"$WORK/hold" 2>"$WORK/freeze.err" &
FREEZER=$!
exec 9>"$WORK/hold"
for _ in $(seq 100); do grep -q '^frozen' "$WORK/freeze.err" && break; sleep 0.1; done
grep -q '^frozen' "$WORK/freeze.err" || fail "freeze did not happen: $(cat "$WORK/freeze.err")"
"$SNAPBLK" status -V vol --socket "$SOCK" -o json | json '.frozen[0]' | grep -qx "$MNT" || fail "status does not show the freeze"
kill -9 "$SERVE_PID"
start=$(date +%s%N)
wait "$SERVE_PID" 2>/dev/null || true
start_serve "$WORK/vol" serve-2 --recover --socket "$SOCK"
timeout 21 touch "$MNT/after-kill" || fail "file system still frozen 21 s after the daemon died"
thaw_ms=$(( ($(date +%s%N) - start) / 1000000 ))
info "file system writable ${thaw_ms} ms after kill -9 (daemon restarted with --recover meanwhile)"
[ "$thaw_ms" -le 21000 ] || fail "thawed after ${thaw_ms} ms, past the deadline plus a second"
exec 9>&-
wait "$FREEZER" 2>/dev/null || true
"$SNAPBLK" snapshot list -V vol --socket "$SOCK" -o json | json 'length' | grep -qx 32 || fail "restarted daemon lists $("$SNAPBLK" snapshot list -V vol --socket "$SOCK")"
echo "$thaw_ms" >"$RESULTS/thaw-after-kill-ms.txt"

info "the first snapshot, cloned, is a clean file system with the files"
sync
umount "$MNT"
stop_serve
"$SNAPBLK" volume clone "$WORK/vol" s0 "$WORK/clone"
start_serve "$WORK/clone" serve-clone --socket "$WORK/clone.sock"
e2fsck -fn "$DEV" >"$RESULTS/e2fsck.txt" 2>&1 || fail "e2fsck of snapshot s0: $(tail -5 "$RESULTS/e2fsck.txt")"
mkdir -p "$WORK/cmnt"
mount -o ro,noload "$DEV" "$WORK/cmnt"
( cd "$WORK/cmnt" && sha256sum -c --quiet "$WORK/sums-before" ) || fail "files of snapshot s0 differ"
umount "$WORK/cmnt"
stop_serve
info "ok"
