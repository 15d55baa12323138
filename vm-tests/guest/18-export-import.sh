#!/bin/bash
# Backup and restore of a served volume: with ext4 mounted and a writer running, a full
# stream and two incrementals are exported through the daemon; imported into a new
# volume and served, the result is byte-identical (cmp on the block devices) to the
# source's snapshot exposed read-only, and so is each earlier snapshot. A stream with a
# flipped byte and a truncated stream are refused and leave no volume behind.
# timeout: 900
set -euo pipefail
. "$GUEST_LIB"

need_cmd mkfs.ext4 fstrim cmp blockdev python3 jq
load_ublk
modprobe_mod ext4 || fail "cannot load ext4"

MNT="$WORK/mnt"
SOCK="$WORK/vol.sock"
RSOCK="$WORK/restored.sock"
WRITER_PID=""
cleanup() {
    [ -n "$WRITER_PID" ] && kill "$WRITER_PID" 2>/dev/null || true
    umount "$MNT" 2>/dev/null || true
}
trap cleanup EXIT

expose() { "$SNAPBLK" snapshot expose "$2" -V "$1" --socket "$3" -o json | json '.device'; }

"$SNAPBLK" volume create "$WORK/vol" --size 256M
start_serve "$WORK/vol" serve-src --socket "$SOCK"
SRC_PID=$SERVE_PID SRC_DEV=$DEV
mkfs.ext4 -q -F "$SRC_DEV"
mkdir -p "$MNT"
mount "$SRC_DEV" "$MNT"
start_writer "$MNT" 100 20

info "three snapshots, with data written, overwritten and trimmed between them"
mkdir -p "$MNT/a" "$MNT/b"
for i in $(seq 1 20); do head -c 256K /dev/urandom >"$MNT/a/f$i"; done
"$SNAPBLK" snapshot create s1 -V vol --socket "$SOCK" >/dev/null
for i in $(seq 1 20); do head -c 128K /dev/urandom >"$MNT/b/f$i"; done
for i in $(seq 1 5); do head -c 256K /dev/urandom >"$MNT/a/f$i"; done
"$SNAPBLK" snapshot create s2 -V vol --socket "$SOCK" >/dev/null
rm -rf "$MNT/b"
fstrim "$MNT"
head -c 4M /dev/urandom >"$MNT/big"
"$SNAPBLK" snapshot create s3 -V vol --socket "$SOCK" >/dev/null

info "export through the daemon while it serves the mounted, busy volume"
"$SNAPBLK" export vol s1 --socket "$SOCK" -o "$WORK/full.snapblk" 2>"$WORK/export1.txt" ||
    fail "full export: $(cat "$WORK/export1.txt")"
"$SNAPBLK" export vol s2 --since s1 --socket "$SOCK" -o "$WORK/inc2.snapblk" 2>"$WORK/export2.txt" ||
    fail "incremental export: $(cat "$WORK/export2.txt")"
# The second incremental goes through stdout, as into a pipe to another machine.
"$SNAPBLK" export vol s3 --since s2 --socket "$SOCK" -o - 2>"$WORK/export3.txt" >"$WORK/inc3.snapblk" ||
    fail "incremental export to stdout: $(cat "$WORK/export3.txt")"
cat "$WORK"/export*.txt | tee "$RESULTS/exports.txt"
grep -q "incremental since s2" "$WORK/export3.txt" || fail "the summary does not say incremental: $(cat "$WORK/export3.txt")"
kill "$WRITER_PID"; wait "$WRITER_PID" 2>/dev/null || true; WRITER_PID=""
ls -l "$WORK"/*.snapblk >>"$RESULTS/exports.txt"

info "damaged streams are refused and leave nothing"
cp "$WORK/inc2.snapblk" "$WORK/flipped.snapblk"
size=$(stat -c %s "$WORK/flipped.snapblk")
python3 -c 'import sys; p = sys.argv[1]; b = bytearray(open(p, "rb").read()); b[len(b) // 2] ^= 0x40; open(p, "wb").write(b)' "$WORK/flipped.snapblk"
cmp -s "$WORK/inc2.snapblk" "$WORK/flipped.snapblk" && fail "the byte was not flipped"
out=$("$SNAPBLK" import "$WORK/bad1" "$WORK/full.snapblk" "$WORK/flipped.snapblk" 2>&1) && fail "a flipped byte was accepted"
echo "$out" | grep -q "flipped.snapblk" || fail "the refusal does not name the stream: $out"
echo "$out" | grep -qi "corrupt\|checksum" || fail "unclear refusal: $out"
[ ! -e "$WORK/bad1" ] || fail "a refused import left $WORK/bad1"
head -c $((size - 100)) "$WORK/inc2.snapblk" >"$WORK/cut.snapblk"
out=$("$SNAPBLK" import "$WORK/bad2" "$WORK/full.snapblk" "$WORK/cut.snapblk" 2>&1) && fail "a truncated stream was accepted"
echo "$out" | grep -q "truncated" || fail "unclear refusal: $out"
[ ! -e "$WORK/bad2" ] || fail "a refused import left $WORK/bad2"
out=$("$SNAPBLK" import "$WORK/bad3" "$WORK/full.snapblk" "$WORK/inc3.snapblk" 2>&1) && fail "an out-of-order chain was accepted"
[ ! -e "$WORK/bad3" ] || fail "a refused import left $WORK/bad3"
info "refused: $(echo "$out" | tail -1)"

info "import the chain into a new volume and serve it"
"$SNAPBLK" import "$WORK/restored" "$WORK/full.snapblk" "$WORK/inc2.snapblk" "$WORK/inc3.snapblk" |
    tee -a "$RESULTS/exports.txt"
start_serve "$WORK/restored" serve-restored --socket "$RSOCK"
RESTORED_PID=$SERVE_PID RESTORED_DEV=$DEV

sdev=$(expose vol s3 "$SOCK")
wait_for_file "$sdev" 10 || fail "$sdev did not appear"
cmp "$sdev" "$RESTORED_DEV" || fail "the restored volume differs from snapshot s3"
info "restored volume = snapshot s3 ($(blockdev --getsize64 "$RESTORED_DEV") bytes compared)"
"$SNAPBLK" snapshot unexpose s3 -V vol --socket "$SOCK" >/dev/null
for s in s1 s2; do
    a=$(expose vol "$s" "$SOCK")
    b=$(expose restored "$s" "$RSOCK")
    wait_for_file "$a" 10 && wait_for_file "$b" 10 || fail "snapshot devices did not appear"
    cmp "$a" "$b" || fail "restored snapshot $s differs from the source's"
    "$SNAPBLK" snapshot unexpose "$s" -V vol --socket "$SOCK" >/dev/null
    "$SNAPBLK" snapshot unexpose "$s" -V restored --socket "$RSOCK" >/dev/null
    info "restored snapshot $s = source snapshot $s"
done

SERVE_PID=$RESTORED_PID DEV=$RESTORED_DEV
stop_serve
umount "$MNT"
SERVE_PID=$SRC_PID DEV=$SRC_DEV
stop_serve
info "ok"
