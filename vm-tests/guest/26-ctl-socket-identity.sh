#!/bin/bash
# Control sockets reach exactly the volume they name: two volumes whose folders are both
# named vol1 are served side by side with their default sockets (named by a hash of the
# canonical folder), and `-V FOLDER` reaches each one's own daemon; a socket of another
# volume is refused; a bare name served twice is refused as ambiguous; a daemon whose
# socket is taken does not serve (no device is added); `serve DIR/x/..` keeps its socket
# under /run/snapblk. Then --allow-uid and --allow-gid: allowed users use the socket,
# others are refused with a clear message.
# timeout: 600
set -euo pipefail
. "$GUEST_LIB"

need_cmd sha256sum setpriv jq
load_ublk

PIDS=""
cleanup() {
    for p in $PIDS; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $PIDS; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

devices() {
    ls /sys/class/ublk-char 2>/dev/null | sort | tr '\n' ' '
}
# default_sock DIR: the default socket of the volume in DIR, as documented.
default_sock() {
    printf '/run/snapblk/%s.sock' "$(printf '%s' "$(readlink -f "$1")" | sha256sum | cut -c1-32)"
}

mkdir -p "$WORK/a" "$WORK/b"
"$SNAPBLK" volume create "$WORK/a/vol1" --size 64M
"$SNAPBLK" volume create "$WORK/b/vol1" --size 64M

info "two volumes named vol1, default sockets"
start_serve "$WORK/a/vol1" serve-a
PID_A=$SERVE_PID DEV_A=$DEV
PIDS="$PIDS $PID_A"
start_serve "$WORK/b/vol1" serve-b
PID_B=$SERVE_PID DEV_B=$DEV
PIDS="$PIDS $PID_B"
! grep -qi "control socket not started" "$RESULTS/serve-b.log" || fail "b/vol1 serves without a control socket"

for v in a b; do
    dev=$DEV_A
    [ "$v" = b ] && dev=$DEV_B
    "$SNAPBLK" status -V "$WORK/$v/vol1" -o json >"$WORK/st-$v.json" || fail "status of $v/vol1 failed"
    [ "$(json '.device.path' <"$WORK/st-$v.json")" = "$dev" ] ||
        fail "-V $WORK/$v/vol1 reached the daemon of another device: $(cat "$WORK/st-$v.json")"
    [ "$(json '.dir' <"$WORK/st-$v.json")" = "$(readlink -f "$WORK/$v/vol1")" ] ||
        fail "status of $v/vol1 names another folder: $(cat "$WORK/st-$v.json")"
done

SOCK_A="$(default_sock "$WORK/a/vol1")"
SOCK_B="$(default_sock "$WORK/b/vol1")"
[ -S "$SOCK_A" ] || fail "no socket $SOCK_A for a/vol1: $(ls /run/snapblk)"
[ -S "$SOCK_B" ] || fail "no socket $SOCK_B for b/vol1: $(ls /run/snapblk)"

info "a snapshot through -V b/vol1 lands in b only"
"$SNAPBLK" snapshot create only-b -V "$WORK/b/vol1" --freeze none >/dev/null
"$SNAPBLK" snapshot list -V "$WORK/b/vol1" -o json >"$WORK/list-b.json"
"$SNAPBLK" snapshot list -V "$WORK/a/vol1" -o json >"$WORK/list-a.json"
grep -q only-b "$WORK/list-b.json" || fail "b/vol1 lacks its snapshot"
! grep -q only-b "$WORK/list-a.json" || fail "the snapshot landed in a/vol1"

info "refusals: another volume's socket, an ambiguous name"
if out=$("$SNAPBLK" status -V "$WORK/b/vol1" --socket "$SOCK_A" 2>&1); then
    fail "-V b/vol1 through a/vol1's socket was answered: $out"
fi
echo "$out" | grep -q "not the volume" || fail "unclear refusal: $out"
if out=$(cd / && "$SNAPBLK" status -V vol1 2>&1); then
    fail "an ambiguous name was answered: $out"
fi
echo "$out" | grep -q "several served volumes" || fail "unclear refusal: $out"

info "a daemon whose socket is taken does not serve"
"$SNAPBLK" volume create "$WORK/c" --size 64M
before="$(devices)"
rc=0
timeout 60 "$SNAPBLK" serve "$WORK/c" --socket "$SOCK_A" >"$RESULTS/serve-c.out" 2>"$RESULTS/serve-c.log" || rc=$?
[ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "serve with a taken socket: exit $rc"
grep -q "in use by another daemon" "$RESULTS/serve-c.log" || fail "unclear refusal: $(cat "$RESULTS/serve-c.log")"
! grep -q '^serving volume' "$RESULTS/serve-c.out" || fail "serve announced a device without its socket"
[ "$(devices)" = "$before" ] || fail "devices changed from [$before] to [$(devices)]"
"$SNAPBLK" status -V "$WORK/a/vol1" >/dev/null || fail "the first daemon lost its socket"

info "serve DIR/x/.. keeps its socket in /run/snapblk"
"$SNAPBLK" volume create "$WORK/e" --size 64M
mkdir "$WORK/e/x"
start_serve "$WORK/e/x/.." serve-e
PID_E=$SERVE_PID
PIDS="$PIDS $PID_E"
[ -S "$(default_sock "$WORK/e")" ] || fail "no socket for $WORK/e under /run/snapblk: $(ls /run/snapblk)"
[ -z "$(find "$WORK" -name '*.sock')" ] || fail "a socket was bound outside /run/snapblk: $(find "$WORK" -name '*.sock')"
"$SNAPBLK" status -V "$WORK/e" -o json >"$WORK/st-e.json" || fail "status of e failed"
[ "$(json '.device.path' <"$WORK/st-e.json")" = "$DEV" ] || fail "status of e: $(cat "$WORK/st-e.json")"

info "--allow-uid and --allow-gid"
cp "$SNAPBLK" /tmp/snapblk-client
chmod 755 /tmp/snapblk-client
# as UID GID CMD...: run CMD as that user, with no supplementary groups, from /.
as() {
    local uid="$1" gid="$2"
    shift 2
    (cd / && setpriv --reuid "$uid" --regid "$gid" --clear-groups "$@")
}
"$SNAPBLK" volume create "$WORK/u" --size 64M
start_serve "$WORK/u" serve-u --socket /run/snapblk-u/ctl.sock --allow-uid 1000
PIDS="$PIDS $SERVE_PID"
U_PID=$SERVE_PID
as 1000 1000 /tmp/snapblk-client status -V u --socket /run/snapblk-u/ctl.sock -o json >"$WORK/u.json" 2>"$WORK/u.err" ||
    fail "allowed uid 1000 was refused: $(cat "$WORK/u.err")"
[ "$(json '.volume.name' <"$WORK/u.json")" = u ] || fail "uid 1000 got: $(cat "$WORK/u.json")"
as 1000 1000 /tmp/snapblk-client snapshot create by-1000 -V u --socket /run/snapblk-u/ctl.sock --freeze none >/dev/null 2>"$WORK/u.err" ||
    fail "allowed uid 1000 could not take a snapshot: $(cat "$WORK/u.err")"
if out=$(as 1001 1001 /tmp/snapblk-client status -V u --socket /run/snapblk-u/ctl.sock 2>&1); then
    fail "uid 1001 was let in: $out"
fi
echo "$out" | grep -q "uid 1001.*not allowed" || fail "unclear refusal of uid 1001: $out"
kill -TERM "$U_PID"; wait "$U_PID" || fail "serve of u did not stop cleanly"

start_serve "$WORK/u" serve-g --socket /run/snapblk-u/ctl.sock --allow-gid 2000
PIDS="$PIDS $SERVE_PID"
G_PID=$SERVE_PID
[ "$(stat -c '%a %g' /run/snapblk-u/ctl.sock)" = "660 2000" ] || fail "socket mode/group: $(stat -c '%a %g' /run/snapblk-u/ctl.sock)"
as 1002 2000 /tmp/snapblk-client snapshot list -V u --socket /run/snapblk-u/ctl.sock -o json >"$WORK/g.json" 2>"$WORK/g.err" ||
    fail "a member of allowed group 2000 was refused: $(cat "$WORK/g.err")"
grep -q by-1000 "$WORK/g.json" || fail "group member got: $(cat "$WORK/g.json")"
if out=$(as 1003 2001 /tmp/snapblk-client status -V u --socket /run/snapblk-u/ctl.sock 2>&1); then
    fail "uid 1003 (gid 2001) was let in: $out"
fi
echo "$out" | grep -q "not allowed" || fail "unclear refusal of gid 2001: $out"
# The daemon's own check holds even when the file's mode is opened by hand.
chmod 666 /run/snapblk-u/ctl.sock
if out=$(as 1003 2001 /tmp/snapblk-client status -V u --socket /run/snapblk-u/ctl.sock 2>&1); then
    fail "uid 1003 was let in through a widened socket: $out"
fi
echo "$out" | grep -q "may not use this control socket" || fail "unclear refusal by the daemon: $out"
kill -TERM "$G_PID"; wait "$G_PID" || fail "serve of u did not stop cleanly"

info "stopping"
for p in $PID_A $PID_B $PID_E; do
    kill -TERM "$p"
    wait "$p" || fail "daemon $p did not stop cleanly"
done
PIDS=""
rm -f /tmp/snapblk-client
