#!/bin/bash
# Runs inside the test VM (after /init has chrooted into the host's root):
# runs each test listed in tests.list with its own timeout, records status,
# duration, output and kernel log into the results share, and cleans up
# between tests. Variables from guest.env (written by vm-tests/run):
#   VM_DIR, REPO, BIN_DIR, SNAPBLK, VM_KEEP, VM_SHELL_CMD, VM_KERNEL_SERIES
set -uo pipefail

VM_RESULTS="$VM_DIR/results"
KERNEL_VERSION="$(uname -r)"
MODTREE="$VM_DIR/modtree"
MODDIR="$MODTREE/lib/modules/$KERNEL_VERSION"
GUEST_LIB="$REPO/vm-tests/guest/lib.sh"
KEEP_MAX_FILE_MB=64

say() {
    local up
    read -r up _ </proc/uptime
    printf 'snapblk-vm: [%8s] %s\n' "$up" "$*"
}
now_ms() { date +%s%3N; }

# Processes left behind by a test (daemons started in the background), not
# counting kernel threads, PID 1, this runner and its own helpers. Builtins
# only: every fork and exec is slow under emulation.
leftover_pids() {
    local p pid stat rest state ppid
    for p in /proc/[0-9]*; do
        pid="${p#/proc/}"
        case "$pid" in 1 | 2 | "$$" | "$BASHPID") continue ;; esac
        read -r stat 2>/dev/null <"$p/stat" || continue
        rest="${stat##*) }"
        state="${rest%% *}"
        rest="${rest#* }"
        ppid="${rest%% *}"
        case "$ppid" in 0 | 2 | "$$" | "$BASHPID") continue ;; esac
        [ "$state" = Z ] && continue
        printf '%s\n' "$pid"
    done
}

declare -A MOUNTS_BEFORE=()
remember_mounts() {
    local dev mp rest
    MOUNTS_BEFORE=()
    while read -r dev mp rest; do
        MOUNTS_BEFORE["$dev $mp"]=1
    done </proc/self/mounts
}

# run_bounded SECONDS CMD...: run CMD, waiting at most SECONDS for it. A
# process stuck in the kernel (e.g. unmounting a file system whose ublk
# server is gone) cannot be killed: it is left behind and 124 returned.
run_bounded() {
    local secs="$1" pid n=0
    shift
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$n" -ge $((secs * 5)) ]; then
            kill -9 "$pid" 2>/dev/null
            return 124
        fi
        sleep 0.2
        n=$((n + 1))
    done
    wait "$pid"
}

# cleanup_after_test LOG: undo what a test may have left behind. Mounts go
# first, while the servers of their devices may still be alive; nothing
# here may block the runner for long.
cleanup_after_test() {
    local log="$1" pid cmd round pids dev mp rest i
    local -a new_mounts=()
    while read -r dev mp rest; do
        [ -n "${MOUNTS_BEFORE["$dev $mp"]:-}" ] || new_mounts+=("$dev $mp")
    done </proc/self/mounts
    for ((i = ${#new_mounts[@]} - 1; i >= 0; i--)); do
        dev="${new_mounts[$i]%% *}"
        mp="$(printf '%b' "${new_mounts[$i]#* }")"
        printf '[runner] unmounting leftover mount %s (%s)\n' "$mp" "$dev" >>"$log"
        if ! run_bounded 10 umount "$mp" 2>>"$log"; then
            printf '[runner] umount %s failed or hangs; detaching it lazily\n' "$mp" >>"$log"
            run_bounded 5 umount -l "$mp" 2>>"$log"
        fi
    done
    for round in 1 2 3; do
        pids="$(leftover_pids)"
        [ -n "$pids" ] || break
        for pid in $pids; do
            if [ "$round" = 1 ]; then
                cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")"
                printf '[runner] killing leftover process %s: %s\n' "$pid" "$cmd" >>"$log"
            fi
            kill -9 "$pid" 2>/dev/null
        done
        sleep 0.5
    done
    if [ -e /sys/module/loop ] && [ -n "$(losetup -n -l 2>/dev/null)" ]; then
        printf '[runner] detaching leftover loop devices\n' >>"$log"
        run_bounded 10 losetup -D 2>>"$log"
    fi
    if [ -e /sys/module/dm_mod ] && compgen -G '/sys/block/dm-*' >/dev/null; then
        printf '[runner] removing leftover device-mapper devices\n' >>"$log"
        run_bounded 10 dmsetup remove_all --force >>"$log" 2>&1
    fi
    # A fresh ublk driver for the next test (unloading it deletes any
    # device a test left behind); impossible while a device is still in use.
    if [ -e /sys/module/ublk_drv/refcnt ]; then
        for dev in /dev/ublkc*; do
            [ -e "$dev" ] && printf '[runner] ublk device left behind: %s\n' "$dev" >>"$log"
        done
        run_bounded 10 rmmod ublk_drv 2>>"$log" \
            || printf '[runner] could not unload ublk_drv; the next tests share its devices\n' >>"$log"
    fi
}

# keep_work WORK DEST: copy a test's scratch folder into its results
# (files over KEEP_MAX_FILE_MB are listed, not copied).
keep_work() {
    local work="$1" dest="$2"
    mkdir -p "$dest"
    (cd "$work" && find . -mindepth 1 -type f -size +"$KEEP_MAX_FILE_MB"M) >"$dest.skipped-large-files" 2>/dev/null
    [ -s "$dest.skipped-large-files" ] || rm -f "$dest.skipped-large-files"
    (cd "$work" && find . -mindepth 1 ! \( -type f -size +"$KEEP_MAX_FILE_MB"M \) \
        \( -type d -o -type f -o -type l \) -print0 | cpio -0 -pdm --quiet "$dest") 2>/dev/null
}

run_test() {
    local name="$1" timeout="$2" path="$3"
    local dir="$VM_RESULTS/tests/$name" work start end ms rc status reason
    mkdir -p "$dir/results"
    work="$(mktemp -d "/tmp/work-$name.XXXXXX")"
    remember_mounts
    dmesg -C 2>/dev/null
    say ">>> $name (timeout ${timeout}s)"
    : >"$dir/started"
    start="$(now_ms)"
    (
        cd "$work" || exit 1
        export TEST_NAME="$name" TEST_TIMEOUT="$timeout" WORK="$work" RESULTS="$dir/results"
        export REPO SNAPBLK BIN_DIR KERNEL_VERSION MODTREE MODDIR GUEST_LIB
        export HOME="$work" RUST_BACKTRACE=1 PATH="$BIN_DIR:$PATH"
        if [ "$path" = - ]; then
            exec timeout -k 10 "$timeout" bash -c "$VM_SHELL_CMD"
        else
            exec timeout -k 10 "$timeout" "$path"
        fi
    ) </dev/null >"$dir/output.log" 2>&1
    rc=$?
    end="$(now_ms)"
    ms=$((end - start))
    reason=""
    if [ "$rc" = 0 ]; then
        status=PASS
    elif [ "$rc" = 77 ]; then
        status=SKIP
        reason="$(grep -v '^[[:space:]]*$' "$dir/output.log" | tail -n 1)"
        reason="${reason#SKIP: }"
    elif { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && [ "$ms" -ge $((timeout * 1000)) ]; then
        status=FAIL
        reason="timed out after ${timeout}s"
        printf '\n[runner] killed: timed out after %ss\n' "$timeout" >>"$dir/output.log"
    else
        status=FAIL
        reason="$(grep '^FAIL: ' "$dir/output.log" | tail -n 1)"
        reason="exit status $rc${reason:+: ${reason#FAIL: }}"
    fi
    cleanup_after_test "$dir/output.log"
    dmesg >"$dir/dmesg.log" 2>/dev/null
    [ "$VM_KEEP" = 1 ] && keep_work "$work" "$dir/work"
    rm -rf --one-file-system "$work" 2>/dev/null
    rmdir "$dir/results" 2>/dev/null
    printf '%s\t%s\t%s\n' "$status" "$ms" "$reason" >"$dir/status"
    say "<<< $name $status $((ms / 1000))s${reason:+ ($reason)}"
}

main() {
    cut -d' ' -f1 /proc/uptime >"$VM_RESULTS/runner.started"
    say "runner started on $KERNEL_VERSION after $(cat "$VM_RESULTS/runner.started") s"
    modprobe -d "$MODTREE" virtio_rng 2>/dev/null || true
    while IFS=$'\t' read -r name timeout path <&3; do
        [ -n "$name" ] || continue
        run_test "$name" "$timeout" "$path"
    done 3<"$VM_RESULTS/tests.list"
    sync
    cut -d' ' -f1 /proc/uptime >"$VM_RESULTS/runner.done"
    say "runner done"
}

# On one line, so that bash has read all of this file before running it.
main "$@"; exit
