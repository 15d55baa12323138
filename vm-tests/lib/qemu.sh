# shellcheck shell=bash
# The QEMU command line shared by vm-tests/run and vm-tests/crash-run (sourced).

# vm_qemu_args IMAGE INITRD MODTREE RESULTS_DIR CPUS MEMORY_MIB [HOST_FOLDER...]:
# sets QEMU_ARGS to boot IMAGE with lib/init (INITRD) under TCG: the host's /
# read-only as the guest's root, the kernel's module tree, RESULTS_DIR
# read-write (it must hold guest.env) and each HOST_FOLDER read-only at its own
# path (listed in RESULTS_DIR/mounts for lib/init). No network, a virtio RNG.
# The caller adds the display and serial ports, and any disk.
vm_qemu_args() {
    local image="$1" initrd="$2" tree="$3" rdir="$4" cpus="$5" mem="$6" i=0 share
    shift 6
    QEMU_ARGS=(
        -accel tcg,thread=multi -cpu max -smp "$cpus" -m "$mem"
        -no-reboot -nic none
        -kernel "$image" -initrd "$initrd"
        -append "console=ttyS0 panic=-1 loglevel=5"
        -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
        -virtfs "local,path=$tree,mount_tag=modtree,security_model=none,readonly=on"
        -virtfs "local,path=$rdir,mount_tag=results,security_model=none"
    )
    : >"$rdir/mounts"
    for share in "$@"; do
        printf 'extra%d %s\n' "$i" "$share" >>"$rdir/mounts"
        QEMU_ARGS+=(-virtfs "local,path=$share,mount_tag=extra$i,security_model=none,readonly=on")
        i=$((i + 1))
    done
    QEMU_ARGS+=(-device virtio-rng-pci)
}
