# shellcheck shell=bash
# Build the test VM's initramfs for a cached kernel (sourced by vm-tests/run;
# needs common.sh and kernels.sh). It holds a static busybox, lib/init as
# /init, and the kernel's 9p modules, decompressed, with their load order.
# Rebuilt only when the init script, busybox or the module set change.

# decompress_module SRC DEST
decompress_module() {
    case "$1" in
        *.ko.xz) xz -dc "$1" >"$2" ;;
        *.ko.zst) zstd -qdc "$1" >"$2" ;;
        *.ko.gz) gzip -dc "$1" >"$2" ;;
        *.ko) cp "$1" "$2" ;;
        *) return 1 ;;
    esac
}

initramfs_build_locked() {
    local here="$1" out="$KERNEL_DIR/initramfs.cpio.gz" stamp="$KERNEL_DIR/initramfs.key"
    local mods key tmp f name
    mods="$(modules_closure "$KERNEL_TREE" "$KERNEL_RELEASE" 9pnet_virtio 9p)" \
        || die "cannot find the 9p modules of kernel $KERNEL_RELEASE"
    key="$({
        cat "$here/init" /bin/busybox
        printf '%s\n' "$mods"
    } | sha256sum | cut -d' ' -f1)"
    if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
        return 0
    fi
    tmp="$(mktemp -d "$KERNEL_DIR/.initramfs.XXXXXX")"
    mkdir -p "$tmp/root/bin" "$tmp/root/dev" "$tmp/root/modules"
    cp /bin/busybox "$tmp/root/bin/busybox"
    cp "$here/init" "$tmp/root/init"
    chmod 755 "$tmp/root/init" "$tmp/root/bin/busybox"
    # The kernel opens /dev/console before running /init; only root can
    # create the node, and /init reopens it from devtmpfs anyway.
    mknod -m 600 "$tmp/root/dev/console" c 5 1 2>/dev/null || true
    : >"$tmp/root/modules/order"
    while IFS= read -r f; do
        name="${f##*/}"
        name="${name%%.ko*}.ko"
        decompress_module "$KERNEL_TREE/lib/modules/$KERNEL_RELEASE/$f" "$tmp/root/modules/$name" \
            || { rm -rf "$tmp"; die "cannot decompress module $f"; }
        printf '%s\n' "$name" >>"$tmp/root/modules/order"
    done <<<"$mods"
    (cd "$tmp/root" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0 | gzip -6) \
        >"$tmp/initramfs.cpio.gz" || { rm -rf "$tmp"; die "cannot build the initramfs"; }
    mv "$tmp/initramfs.cpio.gz" "$out"
    printf '%s\n' "$key" >"$stamp.tmp" && mv "$stamp.tmp" "$stamp"
    rm -rf "$tmp"
}

# initramfs_prepare: sets INITRAMFS for the kernel set up by kernel_prepare.
initramfs_prepare() {
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
    with_cache_lock initramfs_build_locked "$here"
    # shellcheck disable=SC2034 # used by vm-tests/run
    INITRAMFS="$KERNEL_DIR/initramfs.cpio.gz"
}
