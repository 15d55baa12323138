# shellcheck shell=sh
# Helpers for guest tests (vm-tests/guest/NN-name.sh). Source it with
#   . "$GUEST_LIB"        (or  . "$(dirname "$0")/lib.sh")
# It runs inside the test VM; see vm-tests/README.md for the test contract
# and the environment each test gets (SNAPBLK, WORK, RESULTS, MODTREE, ...).
# Plain POSIX sh, so it works from sh and bash tests alike.

# skip REASON: end the test as skipped (exit 77); REASON is its last line.
skip() {
    echo "SKIP: $*"
    exit 77
}

# fail MESSAGE: end the test as failed.
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# _uptime_cs: sets _u to the guest's uptime in hundredths of a second (no fork: under
# emulation a subshell costs tens of milliseconds).
_uptime_cs() {
    read -r _u _ </proc/uptime
    _u="${_u%.*}${_u#*.}"
}
_uptime_cs
_test_start="$_u"

# info MESSAGE: a progress line in the test's output, with the seconds since the test
# sourced this file (where a slow test spends its time).
info() {
    _uptime_cs
    _e=$((_u - _test_start))
    printf -- '--- [%d.%02ds] %s\n' $((_e / 100)) $((_e % 100)) "$*"
}

# need_cmd CMD...: fail unless every CMD is in PATH.
need_cmd() {
    for _c in "$@"; do
        command -v "$_c" >/dev/null 2>&1 || fail "command not found in the guest: $_c"
    done
}

# wait_for_file PATH TIMEOUT_SECONDS: wait until PATH exists (file, device
# node, socket...); returns 1 on timeout.
wait_for_file() {
    _deadline=$(($(date +%s) + ${2:-10}))
    while [ ! -e "$1" ]; do
        [ "$(date +%s)" -lt "$_deadline" ] || return 1
        sleep 0.1
    done
}

# modprobe_mod NAME [PARAM=VALUE...]: load a module of the guest kernel
# (ext4, xfs, loop, dm-thin-pool, ...) from the kernel's module tree.
modprobe_mod() {
    modprobe -d "$MODTREE" "$@" || {
        echo "modprobe $* failed (kernel $KERNEL_VERSION)" >&2
        return 1
    }
}

# load_ublk: load ublk_drv and wait for /dev/ublk-control; fails the test
# if the driver cannot be loaded.
load_ublk() {
    modprobe_mod ublk_drv || fail "cannot load ublk_drv"
    wait_for_file /dev/ublk-control 10 || fail "/dev/ublk-control did not appear"
}

# json FILTER: the value FILTER (jq syntax) picks from the JSON on stdin, strings
# unquoted. jq, not python: under emulation python3 takes most of a second to start.
json() {
    jq -r "$1"
}

# start_writer DIR FILES RATE: one process that keeps rewriting DIR/load-0 ..
# DIR/load-(FILES-1) with 64 KiB of random data each, RATE files a second, until
# killed (its pid in WRITER_PID); it stops on its own at the first failed write. The
# background load of the snapshot tests: one process, not a fork per file, which
# costs about 100 ms of emulated CPU each and starved the rest of the test.
start_writer() {
    python3 - "$@" <<'PY' &
import os, sys, time
folder, files, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
i, due = 0, time.monotonic()
while True:
    with open(os.path.join(folder, "load-%d" % (i % files)), "wb") as f:
        f.write(os.urandom(65536))
    i += 1
    due += 1 / rate
    time.sleep(max(0.0, due - time.monotonic()))
PY
    WRITER_PID=$!
}

# Daemon helpers shared by the snapblk tests.

# start_serve VOLDIR NAME [ARGS...]: starts the daemon, waits for its ready line;
# sets SERVE_PID and DEV. Logs go to $RESULTS/NAME.log.
start_serve() {
    local vol="$1" name="$2" deadline
    shift 2
    "$SNAPBLK" serve "$vol" "$@" >"$RESULTS/$name.out" 2>"$RESULTS/$name.log" &
    SERVE_PID=$!
    deadline=$(($(date +%s) + 60))
    until grep -q '^serving volume ' "$RESULTS/$name.out" 2>/dev/null; do
        if ! kill -0 "$SERVE_PID" 2>/dev/null; then
            tail -20 "$RESULTS/$name.log" >&2
            fail "serve exited before its device was live"
        fi
        [ "$(date +%s)" -lt "$deadline" ] || fail "no ready line from serve after 60s"
        sleep 0.1
    done
    DEV="$(sed -n 's|^serving volume .* as \(/dev/ublkb[0-9]*\)$|\1|p' "$RESULTS/$name.out" | tail -n 1)"
    [ -n "$DEV" ] || fail "cannot parse the ready line: $(cat "$RESULTS/$name.out")"
    wait_for_file "$DEV" 10 || fail "$DEV did not appear"
}

# stop_serve: SIGTERM the daemon, require exit status 0 and the device gone.
stop_serve() {
    local rc=0
    kill -TERM "$SERVE_PID"
    wait "$SERVE_PID" || rc=$?
    [ "$rc" = 0 ] || fail "serve exited with status $rc after SIGTERM"
    for _ in $(seq 50); do [ -e "$DEV" ] || break; sleep 0.1; done
    [ ! -e "$DEV" ] || fail "$DEV still exists after the daemon stopped"
}

# CSI helpers (tests 20 and up). The driver runs as `snapblk csi all-in-one` with its
# socket at $CSI_SOCK and its state in $CSI_STATE; csi-call (next to $SNAPBLK) sends the
# kubelet's and the sidecars' calls.

CSI_SOCK="$WORK/csi/csi.sock"
CSI_STATE="$WORK/csi-state"
CSI_NODE="vm-node"

# start_csi NAME [ARGS...]: starts the all-in-one driver with ARGS added (log in
# $RESULTS/NAME.log), waits until its Probe answers; sets CSI_PID.
start_csi() {
    local name="$1" deadline
    shift
    "$SNAPBLK" csi all-in-one --endpoint "unix://$CSI_SOCK" --node-id "$CSI_NODE" \
        --state-dir "$CSI_STATE" "$@" >>"$RESULTS/$name.log" 2>&1 &
    CSI_PID=$!
    deadline=$(($(date +%s) + 60))
    until "$BIN_DIR/csi-call" --endpoint "unix://$CSI_SOCK" probe >/dev/null 2>&1; do
        kill -0 "$CSI_PID" 2>/dev/null || { tail -20 "$RESULTS/$name.log" >&2; fail "the CSI driver exited"; }
        [ "$(date +%s)" -lt "$deadline" ] || fail "the CSI driver did not answer Probe within 60s"
        sleep 0.2
    done
}

# csi CALL ARGS...: one CSI call; its key=value answer goes to $CSI_OUT. Fails the test
# when the call fails.
CSI_OUT="$WORK/csi-last.out"
csi() {
    "$BIN_DIR/csi-call" --endpoint "unix://$CSI_SOCK" "$@" >"$CSI_OUT" 2>"$CSI_OUT.err" ||
        fail "csi-call $*: $(grep '^error_code=' "$CSI_OUT") $(cat "$CSI_OUT.err")"
}

# csi_expect_error CODE CALL ARGS...: the call must fail with gRPC code CODE.
csi_expect_error() {
    local want="$1"
    shift
    if "$BIN_DIR/csi-call" --endpoint "unix://$CSI_SOCK" "$@" >"$CSI_OUT" 2>"$CSI_OUT.err"; then
        fail "csi-call $* succeeded; expected $want"
    fi
    grep -qx "error_code=$want" "$CSI_OUT" ||
        fail "csi-call $*: expected $want, got $(grep '^error_code=' "$CSI_OUT") $(cat "$CSI_OUT.err")"
}

# kv KEY: the value of KEY in the last answer.
kv() {
    sed -n "s/^$1=//p" "$CSI_OUT" | head -n 1
}
