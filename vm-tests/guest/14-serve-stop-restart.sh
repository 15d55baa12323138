#!/bin/bash
# Clean stop: SIGTERM (and SIGINT) while idle make the daemon exit 0 and remove the
# device (node, sysfs entry, libublk json); a second `serve` (with --id) sees all the
# data written before, including buffered writes never explicitly synced. SIGTERM with
# an ext4 still mounted must not hang either (libublk-rs issue 50): the kernel syncs
# the file system, the daemon exits, and the device is freed once it is unmounted.
# SIGTERM under a QD32 write load: requests being served when the queues stop must
# hold neither the daemon nor the device back, and the volume serves again after.
# Queue threads may run on every CPU the daemon may use, unless --pin-queues.
# timeout: 600
set -euo pipefail
. "$GUEST_LIB"

need_cmd cmp mkfs.ext4 sha256sum fio
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"

# signal_and_wait SECONDS WHAT [SIGNAL]: signal the daemon (SIGTERM by default),
# require exit 0 within SECONDS; WHAT says in which situation.
signal_and_wait() {
    local secs="$1" what="$2" sig="${3:-TERM}" rc=0 start
    start=$(date +%s)
    kill "-$sig" "$SERVE_PID"
    for _ in $(seq $((secs * 10))); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$SERVE_PID" 2>/dev/null && fail "serve still running ${secs}s after SIG$sig $what"
    wait "$SERVE_PID" || rc=$?
    [ "$rc" = 0 ] || fail "serve exited with status $rc after SIG$sig $what"
    info "SIG$sig $what: daemon exited 0 in $(($(date +%s) - start))s"
}

# stop_with SIGNAL: stop the idle daemon, require exit 0 within 30 s and every
# trace of the device gone.
stop_with() {
    local sig="$1" id="${DEV#/dev/ublkb}"
    signal_and_wait 30 "while idle" "$sig"
    for _ in $(seq 50); do [ -e "$DEV" ] || break; sleep 0.1; done
    [ ! -e "$DEV" ] || fail "$DEV still exists after SIG$sig"
    [ ! -e "/sys/class/ublk-char/ublkc$id" ] || fail "ublkc$id still registered after SIG$sig"
    [ ! -e "/run/ublksrvd/$(printf %04d "$id").json" ] || fail "libublk json of device $id left behind"
    info "device $id removed"
}

# cpus_of PATH: the Cpus_allowed_list of a process or thread (/proc/PID[/task/TID]).
cpus_of() { awk '/^Cpus_allowed_list/ {print $2}' "$1/status"; }

# narrower_threads PID: how many threads of PID may run on other CPUs than PID itself.
narrower_threads() {
    local pid="$1" own n=0 t
    own="$(cpus_of "/proc/$pid")"
    for t in /proc/"$pid"/task/*; do
        [ "$(cpus_of "$t")" = "$own" ] || n=$((n + 1))
    done
    echo "$n"
}

MIB=$((1 << 20))
"$SNAPBLK" volume create "$WORK/vol" --size 64M
head -c $((64 * MIB)) /dev/urandom >"$WORK/pattern"

start_serve "$WORK/vol" serve-1
own="$(cpus_of "/proc/$SERVE_PID")"
n="$(narrower_threads "$SERVE_PID")"
[ "$n" = 0 ] || fail "$n thread(s) of the daemon are pinned narrower than its CPUs $own by default"
grep -q "device is live.*queue_cpus=$own" "$RESULTS/serve-1.log" \
    || fail "the live line does not say the queue threads run on CPUs $own"
info "queue threads may run on CPUs $own"
# Direct writes for the first half, buffered ones (no sync: closing the device
# writes them back) for the second half.
dd if="$WORK/pattern" of="$DEV" bs=1M count=32 oflag=direct status=none
dd if="$WORK/pattern" of="$DEV" bs=1M skip=32 seek=32 count=32 status=none
sleep 1
stop_with TERM

start_serve "$WORK/vol" serve-2 --id 5
[ "$DEV" = /dev/ublkb5 ] || fail "--id 5 gave $DEV"
cmp "$DEV" "$WORK/pattern" || fail "the second daemon does not see the data written before"
info "all 64 MiB read back through a new daemon"
# Overwrite a part and stop with SIGINT this time.
dd if=/dev/zero of="$DEV" bs=1M seek=10 count=4 oflag=direct status=none
stop_with INT

start_serve "$WORK/vol" serve-3 --pin-queues
grep -q "device is live.*queue_cpus=pinned per queue" "$RESULTS/serve-3.log" \
    || fail "the live line does not say the queue threads are pinned"
if [ "$(nproc)" -ge 2 ]; then
    n="$(narrower_threads "$SERVE_PID")"
    [ "$n" -ge 1 ] || fail "--pin-queues on $(nproc) CPUs left every thread on all of them"
    info "--pin-queues: $n thread(s) pinned narrower than the daemon's CPUs $own"
fi
dd if=/dev/zero of="$WORK/pattern" bs=1M seek=10 count=4 conv=notrunc status=none
cmp "$DEV" "$WORK/pattern" || fail "data differs after the SIGINT stop"
info "data intact after SIGINT"
stop_with TERM

# SIGTERM with a mounted file system.
start_serve "$WORK/vol" serve-4
id="${DEV#/dev/ublkb}"
mkfs.ext4 -q -F "$DEV"
mkdir -p "$WORK/mnt"
mount -t ext4 "$DEV" "$WORK/mnt"
head -c $((4 * MIB)) /dev/urandom >"$WORK/mnt/synced"
sync
head -c $((4 * MIB)) /dev/urandom >"$WORK/mnt/unsynced"
(cd "$WORK/mnt" && sha256sum synced unsynced) >"$WORK/sums"
signal_and_wait 30 "with ext4 mounted"
grep -q 'still mounted' "$RESULTS/serve-4.log" || fail "no warning about the mounted file system"
umount "$WORK/mnt" || fail "cannot unmount the file system of the stopped device"
for _ in $(seq 50); do [ -e "/sys/class/ublk-char/ublkc$id" ] || break; sleep 0.1; done
[ ! -e "/sys/class/ublk-char/ublkc$id" ] || fail "device $id still registered after umount"
info "device $id freed after umount"

start_serve "$WORK/vol" serve-5
mount -t ext4 "$DEV" "$WORK/mnt"
(cd "$WORK/mnt" && sha256sum -c --quiet "$WORK/sums") || fail "files written before the stop differ"
umount "$WORK/mnt"
e2fsck -fn "$DEV" >"$RESULTS/fsck.txt" 2>&1 || fail "e2fsck found problems after a stop while mounted"
info "files written before the stop (even unsynced) are intact, e2fsck clean"
stop_with TERM

# SIGTERM in the middle of a write job.
start_serve "$WORK/vol" serve-6
id="${DEV#/dev/ublkb}"
fio --name=busy --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bs=4k --iodepth=32 --time_based --runtime=120 >"$RESULTS/fio-busy.txt" 2>&1 &
FIO_PID=$!
sleep 3
kill -0 "$FIO_PID" 2>/dev/null || fail "fio ended before the stop: $(tail -n 5 "$RESULTS/fio-busy.txt")"
signal_and_wait 15 "under a QD32 write load"
# fio fails once the device is gone; it must not hang on it.
for _ in $(seq 300); do kill -0 "$FIO_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$FIO_PID" 2>/dev/null; then
    kill -9 "$FIO_PID"
    fail "fio still running 30s after the daemon stopped"
fi
wait "$FIO_PID" || true
for _ in $(seq 50); do [ -e "/sys/class/ublk-char/ublkc$id" ] || break; sleep 0.1; done
[ ! -e "/sys/class/ublk-char/ublkc$id" ] || fail "device $id still registered after the stop under load"

start_serve "$WORK/vol" serve-7
dd if="$DEV" of=/dev/null bs=1M status=none || fail "cannot read the volume back after a stop under load"
info "the volume serves and reads back in full after the stop under load"
stop_with TERM
