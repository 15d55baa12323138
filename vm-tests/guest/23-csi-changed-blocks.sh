#!/bin/bash
# Changed-block tracking through the CSI SnapshotMetadata service, on a served volume:
# random 4 KiB blocks written, snapshot s1; other blocks rewritten, a run written and
# some blocks discarded, snapshot s2. GetMetadataDelta(s1, s2) must name exactly the
# blocks that differ between the two snapshots, as found by reading restores of both
# block by block; GetMetadataAllocated(s2) exactly the blocks that hold data; paged
# answers (max_results, starting_offset) must add up to the whole. Then the incremental
# copy a backup tool makes, the delta's ranges copied from the target's restore onto the
# base's restore, gives a volume equal to the target (cmp).
# timeout: 900
# kernels: 7
set -euo pipefail
. "$GUEST_LIB"

need_cmd python3 cmp blkdiscard
load_ublk

cleanup() {
    { grep -o " $WORK/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount "$m" 2>/dev/null || true; done
    [ -n "${CSI_PID:-}" ] && kill "$CSI_PID" 2>/dev/null || true
}
trap cleanup EXIT

BS=4096
BLOCKS=16384 # 64 MiB
start_csi driver

# block_volume NAME [ARGS...]: a block volume staged and published at $WORK/NAME/dev;
# sets VOL.
block_volume() {
    local name="$1"
    shift
    csi create-volume --name "pvc-$name" --size $((BLOCKS * BS)) --node "$CSI_NODE" --block "$@"
    VOL=$(kv volume_id)
    mkdir -p "$WORK/$name/staging" "$WORK/$name/pod"
    csi stage --volume "$VOL" --staging "$WORK/$name/staging" --block
    csi publish --volume "$VOL" --staging "$WORK/$name/staging" --target "$WORK/$name/dev" --block
}

# Writes random data to the blocks listed in file $2 of device $1, then syncs it.
write_blocks() {
    python3 - "$1" "$2" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
for line in open(sys.argv[2]):
    os.pwrite(fd, os.urandom(4096), int(line) * 4096)
os.fsync(fd)
EOF
}

# The blocks of the `range=OFFSET,LENGTH` lines of the last answer, one a line, sorted.
range_blocks() {
    python3 -c '
import sys
out = set()
for line in open(sys.argv[1]):
    if line.startswith("range="):
        off, length = map(int, line[6:].split(","))
        assert off % 4096 == 0 and length % 4096 == 0 and length > 0, line
        out.update(range(off // 4096, (off + length) // 4096))
print("\n".join(map(str, sorted(out))))' "$CSI_OUT"
}

block_volume src
SRC_VOL=$VOL
SRC="$WORK/src/dev"
python3 -c "
import random
r = random.Random(1)
a = sorted(r.sample(range($BLOCKS), 400))
b = sorted(set(r.sample(a, 60)) | set(r.sample(range($BLOCKS), 120)) | set(range(5000, 5064)))
d = sorted(set(r.sample(sorted(set(a) - set(b)), 30)))
open('$WORK/a', 'w').write('\n'.join(map(str, a)) + '\n')
open('$WORK/b', 'w').write('\n'.join(map(str, b)) + '\n')
open('$WORK/d', 'w').write('\n'.join(map(str, d)) + '\n')
"
info "base: $(wc -l <"$WORK/a") blocks written"
write_blocks "$SRC" "$WORK/a"
csi create-snapshot --volume "$SRC_VOL" --name snapshot-cbt-1
S1=$(kv snapshot_id)
info "after s1: $(wc -l <"$WORK/b") blocks written, $(wc -l <"$WORK/d") discarded"
write_blocks "$SRC" "$WORK/b"
while read -r blk; do blkdiscard -o $((blk * BS)) -l $BS "$SRC"; done <"$WORK/d"
csi create-snapshot --volume "$SRC_VOL" --name snapshot-cbt-2
S2=$(kv snapshot_id)

info "GetMetadataDelta(s1, s2)"
csi metadata-delta --base "$S1" --target "$S2"
[ "$(kv block_metadata_type)" = VARIABLE_LENGTH ] || fail "type: $(head -3 "$CSI_OUT")"
[ "$(kv volume_capacity_bytes)" = $((BLOCKS * BS)) ] || fail "capacity: $(head -3 "$CSI_OUT")"
figure_ms=$(kv elapsed_ms)
range_blocks >"$WORK/delta"
sort -n -u "$WORK/b" "$WORK/d" >"$WORK/changed"
cmp -s "$WORK/delta" "$WORK/changed" ||
    fail "the delta names $(wc -l <"$WORK/delta") blocks, $(wc -l <"$WORK/changed") were written or discarded: $(diff "$WORK/delta" "$WORK/changed" | head -5)"
info "delta: $(grep -c '^range=' "$CSI_OUT") ranges, $(wc -l <"$WORK/delta") blocks, in $figure_ms ms"

info "paged: 7 ranges a message, from the middle"
csi metadata-delta --base "$S1" --target "$S2" --max-results 7 --starting-offset $((5000 * BS))
range_blocks >"$WORK/delta-tail"
awk '$1 >= 5000' "$WORK/changed" >"$WORK/changed-tail"
cmp -s "$WORK/delta-tail" "$WORK/changed-tail" || fail "the paged delta from block 5000 differs: $(diff "$WORK/delta-tail" "$WORK/changed-tail" | head -5)"

info "GetMetadataAllocated(s2)"
csi metadata-allocated --snapshot "$S2"
range_blocks >"$WORK/allocated"
sort -n -u "$WORK/a" "$WORK/b" | grep -vxF -f "$WORK/d" >"$WORK/holding" || true
cmp -s "$WORK/allocated" "$WORK/holding" || fail "allocated names $(wc -l <"$WORK/allocated") blocks, $(wc -l <"$WORK/holding") hold data"

info "the snapshots compared block by block (restores of both)"
block_volume r1 --from-snapshot "$S1"
block_volume r2 --from-snapshot "$S2"
python3 - "$WORK/r1/dev" "$WORK/r2/dev" "$BLOCKS" >"$WORK/differ" <<'EOF'
import sys
a, b, n = open(sys.argv[1], "rb"), open(sys.argv[2], "rb"), int(sys.argv[3])
for i in range(n):
    if a.read(4096) != b.read(4096):
        print(i)
EOF
cmp -s "$WORK/differ" "$WORK/delta" ||
    fail "$(wc -l <"$WORK/differ") blocks differ between the snapshots, the delta names $(wc -l <"$WORK/delta"): $(diff "$WORK/differ" "$WORK/delta" | head -5)"

info "incremental copy: the delta's ranges from the target onto the base's restore"
csi metadata-delta --base "$S1" --target "$S2"
sed -n 's/^range=//p' "$CSI_OUT" | while IFS=, read -r off len; do
    dd if="$WORK/r2/dev" of="$WORK/r1/dev" bs=$BS skip=$((off / BS)) seek=$((off / BS)) count=$((len / BS)) \
        iflag=direct oflag=direct conv=notrunc status=none
done
sync
cmp "$WORK/r1/dev" "$WORK/r2/dev" || fail "the base plus the delta is not the target"

info "a foreign base is refused, so a backup tool falls back to a full copy"
block_volume other
csi create-snapshot --volume "$VOL" --name snapshot-cbt-other
OTHER=$(kv snapshot_id)
csi_expect_error FailedPrecondition metadata-delta --base "$OTHER" --target "$S2"
csi_expect_error NotFound metadata-delta --base "$CSI_NODE/0123456789abcdef/1" --target "$S2"
info "changed blocks: $(wc -l <"$WORK/delta") of $BLOCKS, GetMetadataDelta in $figure_ms ms"
