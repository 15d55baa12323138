# shellcheck shell=bash
# Fetch and cache the guest kernels (sourced by vm-tests/run; needs common.sh).
#
# The host's own kernel has no ublk driver, so the tests boot Debian kernels
# that build ublk_drv as a module. Packages are fetched with apt-get download
# and unpacked with dpkg -x into the cache; nothing is installed on the host.
#
# Apt runs with private state under <cache>/apt (its own sources list, package
# lists and download folder), so the host's apt configuration is left alone:
# adding trixie-backports to a bookworm host's sources would otherwise offer
# its packages to upgrades of the host.
#
# Cache layout (<cache> = vm_cache_dir):
#   <cache>/apt/                    private apt state
#   <cache>/kernels/<series>.env    the release cached for a series (6.12, 7)
#   <cache>/kernels/<release>/tree  unpacked packages, depmod done; modprobe -d tree
#   <cache>/kernels/<release>/initramfs.cpio.gz (see initramfs.sh)
#
# A series is re-resolved only when nothing is cached for it or when a refresh
# is asked for; a warm cache never touches apt or the network.

KERNEL_SERIES_ALL=(6.12 7)

# kernel_series_info SERIES: sets SERIES_SUITE and SERIES_PREFIX.
kernel_series_info() {
    case "$1" in
        6.12) SERIES_SUITE=bookworm-backports SERIES_PREFIX=6.12. ;;
        7) SERIES_SUITE=trixie-backports SERIES_PREFIX=7. ;;
        *) die "unknown kernel series '$1' (known: ${KERNEL_SERIES_ALL[*]})" ;;
    esac
}

# The Debian archive to fetch from: $SNAPBLK_DEBIAN_MIRROR, else the first
# main-archive mirror in the host's apt sources, else deb.debian.org.
debian_mirror() {
    if [ -n "${SNAPBLK_DEBIAN_MIRROR:-}" ]; then
        printf '%s\n' "${SNAPBLK_DEBIAN_MIRROR%/}"
        return
    fi
    local uri
    uri="$(
        {
            sed -n 's/^[[:space:]]*URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | tr ' ' '\n'
            sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
                /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
        } | grep -E '^https?://[^[:space:]]+/debian/?$' | head -n 1 || true
    )"
    uri="${uri:-http://deb.debian.org/debian}"
    printf '%s\n' "${uri%/}"
}

# Options that point apt at the private state under <cache>/apt.
apt_private_init() {
    APT_DIR="$(vm_cache_dir)/apt"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial" "$APT_DIR/preferences.d" \
        || die "cannot create $APT_DIR"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg mirror
    [ -r "$keyring" ] || die "$keyring not found (package debian-archive-keyring)"
    mirror="$(debian_mirror)"
    printf 'deb [signed-by=%s] %s %s main\n' \
        "$keyring" "$mirror" bookworm-backports \
        "$keyring" "$mirror" trixie-backports >"$APT_DIR/sources.list"
    : >"$APT_DIR/status"
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
        -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
        -o "Dir::Etc::Preferences=$APT_DIR/preferences"
        -o "Dir::Etc::PreferencesParts=$APT_DIR/preferences.d"
        -o "Dir::State::Lists=$APT_DIR/lists"
        -o "Dir::State::status=$APT_DIR/status"
        -o "Dir::Cache=$APT_DIR"
        -o "Dir::Cache::Archives=$APT_DIR/archives"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
        -o "APT::Architecture=amd64"
        -o "APT::Architectures=amd64"
        -o "Acquire::Languages=none"
        -o "Debug::NoLocking=true"
    )
    if [ "$(id -u)" -eq 0 ]; then
        # The cache usually sits under root's home, where apt's unprivileged
        # download user cannot write.
        APT_OPTS+=(-o "APT::Sandbox::User=root")
    fi
}

# Update the private package lists (once per run). On failure, apt's output
# is left in APT_UPDATE_LOG.
APT_UPDATED=0
apt_private_update() {
    [ "$APT_UPDATED" = 1 ] && return 0
    APT_UPDATE_LOG="$APT_DIR/update.log"
    if ! apt-get "${APT_OPTS[@]}" -q update >"$APT_UPDATE_LOG" 2>&1 \
        || grep -qE '^(E: |W: Failed to fetch|W: Some index files failed)' "$APT_UPDATE_LOG"; then
        return 1
    fi
    APT_UPDATED=1
}

# kernel_resolve SERIES: from the meta package linux-image-amd64 in the
# series' suite, find the kernel release (uname -r) and the packages to
# fetch. Sets RES_RELEASE, RES_VERSION, RES_PACKAGES.
kernel_resolve() {
    local series="$1" meta_version dep
    kernel_series_info "$series"
    meta_version="$(apt-cache "${APT_OPTS[@]}" madison linux-image-amd64 \
        | awk -F'|' -v suite="$SERIES_SUITE" '$3 ~ (" " suite "/") { gsub(/ /, "", $2); print $2; exit }')"
    [ -n "$meta_version" ] || { warn "linux-image-amd64 not found in $SERIES_SUITE"; return 1; }
    dep="$(apt-cache "${APT_OPTS[@]}" depends "linux-image-amd64=$meta_version" \
        | sed -nE 's/^[[:space:]]*Depends: (linux-image-[0-9][^[:space:]]*-amd64)$/\1/p' | head -n 1)"
    [ -n "$dep" ] || { warn "cannot find the kernel image package linux-image-amd64=$meta_version depends on"; return 1; }
    RES_RELEASE="${dep#linux-image-}"
    case "$RES_RELEASE" in
        "$SERIES_PREFIX"*) ;;
        *)
            warn "$SERIES_SUITE now carries kernel $RES_RELEASE, not $SERIES_PREFIX*; update kernel_series_info in vm-tests/lib/kernels.sh"
            return 1
            ;;
    esac
    RES_VERSION="$meta_version"
    # bookworm ships one package with image and modules; trixie splits them
    # into linux-binary-* (image), linux-modules-* and linux-base-*.
    if pkg_available "linux-image-$RES_RELEASE-unsigned"; then
        RES_PACKAGES=("linux-image-$RES_RELEASE-unsigned")
    elif pkg_available "linux-binary-$RES_RELEASE" && pkg_available "linux-modules-$RES_RELEASE"; then
        RES_PACKAGES=("linux-binary-$RES_RELEASE" "linux-modules-$RES_RELEASE")
        # modules.builtin, modules.order and the config
        if pkg_available "linux-base-$RES_RELEASE"; then
            RES_PACKAGES+=("linux-base-$RES_RELEASE")
        fi
    elif pkg_available "linux-image-$RES_RELEASE"; then
        RES_PACKAGES=("linux-image-$RES_RELEASE")
    else
        warn "no known package layout for kernel $RES_RELEASE"
        return 1
    fi
}

pkg_available() {
    apt-cache "${APT_OPTS[@]}" show --no-all-versions "$1" >/dev/null 2>&1
}

# Path of the kernel image inside an unpacked tree.
find_vmlinuz() {
    local tree="$1" release="$2" f
    for f in "boot/vmlinuz-$release" "usr/lib/modules/$release/vmlinuz" "lib/modules/$release/vmlinuz"; do
        if [ -f "$tree/$f" ]; then
            printf '%s\n' "$f"
            return 0
        fi
    done
    return 1
}

# kernel_fetch SERIES: download, unpack and depmod RES_RELEASE into the cache.
kernel_fetch() {
    local series="$1" kdir="$KERNELS_DIR/$RES_RELEASE" tmp pkg deb vmlinuz
    tmp="$(mktemp -d "$KERNELS_DIR/.fetch.XXXXXX")" || return 1
    msg "fetching kernel $RES_RELEASE (${RES_PACKAGES[*]}) from $SERIES_SUITE"
    (
        cd "$tmp" || exit 1
        apt-get "${APT_OPTS[@]}" -q download "${RES_PACKAGES[@]}" >download.log 2>&1 \
            || { cat download.log >&2; exit 1; }
    ) || { rm -rf "$tmp"; warn "apt-get download failed"; return 1; }
    mkdir -p "$tmp/tree" || return 1
    for pkg in "${RES_PACKAGES[@]}"; do
        deb="$(find "$tmp" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)"
        [ -n "$deb" ] || { rm -rf "$tmp"; warn "downloaded package $pkg not found"; return 1; }
        dpkg -x "$deb" "$tmp/tree" || { rm -rf "$tmp"; warn "dpkg -x $deb failed"; return 1; }
        rm -f "$deb"
    done
    # trixie packages install under usr/lib/modules; modprobe -d and depmod -b
    # look under <root>/lib/modules.
    if [ ! -e "$tmp/tree/lib" ] && [ -d "$tmp/tree/usr/lib/modules" ]; then
        ln -s usr/lib "$tmp/tree/lib"
    fi
    [ -d "$tmp/tree/lib/modules/$RES_RELEASE" ] \
        || { rm -rf "$tmp"; warn "no modules for $RES_RELEASE in the packages"; return 1; }
    vmlinuz="$(find_vmlinuz "$tmp/tree" "$RES_RELEASE")" \
        || { rm -rf "$tmp"; warn "no kernel image found in the packages"; return 1; }
    depmod -b "$tmp/tree" "$RES_RELEASE" \
        || { rm -rf "$tmp"; warn "depmod failed for $RES_RELEASE"; return 1; }
    if ! find "$tmp/tree/lib/modules/$RES_RELEASE" -name 'ublk_drv.ko*' | grep -q . \
        && ! grep -q '/ublk_drv.ko' "$tmp/tree/lib/modules/$RES_RELEASE/modules.builtin"; then
        rm -rf "$tmp"
        warn "kernel $RES_RELEASE has no ublk_drv"
        return 1
    fi
    {
        printf 'KERNEL_SERIES=%q\n' "$series"
        printf 'KERNEL_RELEASE=%q\n' "$RES_RELEASE"
        printf 'KERNEL_PKG_VERSION=%q\n' "$RES_VERSION"
        printf 'KERNEL_SUITE=%q\n' "$SERIES_SUITE"
        printf 'KERNEL_PACKAGES=%q\n' "${RES_PACKAGES[*]}"
        printf 'KERNEL_VMLINUZ=%q\n' "$vmlinuz"
        printf 'KERNEL_FETCHED=%q\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$tmp/kernel.env"
    rm -f "$tmp/download.log"
    rm -rf "$kdir"
    mv "$tmp" "$kdir" || { rm -rf "$tmp"; warn "cannot move the kernel into $kdir"; return 1; }
}

kernel_cached_ok() {
    local release="$1"
    [ -n "$release" ] && [ -f "$KERNELS_DIR/$release/kernel.env" ] && [ -d "$KERNELS_DIR/$release/tree" ]
}

# Remove unpacked kernels no series points at any more.
kernel_prune() {
    local d keep f rel
    for d in "$KERNELS_DIR"/*/; do
        [ -d "$d" ] || continue
        rel="$(basename "$d")"
        keep=0
        for f in "$KERNELS_DIR"/*.env; do
            [ -f "$f" ] || continue
            if grep -qxF "KERNEL_RELEASE=$(printf '%q' "$rel")" "$f"; then keep=1; fi
        done
        if [ "$keep" = 0 ]; then
            msg "removing old cached kernel $rel"
            rm -rf "$d"
        fi
    done
    rm -rf "$KERNELS_DIR"/.fetch.*
}

# modules_closure [--lenient] TREE RELEASE MODULE...: print the module files
# (relative to the release's module folder) needed to load MODULEs,
# dependencies first. Built-in modules are left out; unknown ones are an
# error, or skipped with --lenient.
modules_closure() {
    local lenient=0
    if [ "$1" = --lenient ]; then
        lenient=1
        shift
    fi
    local tree="$1" release="$2"
    shift 2
    local dep_file="$tree/lib/modules/$release/modules.dep"
    local builtin_file="$tree/lib/modules/$release/modules.builtin"
    local -A deps=() by_name=() seen=()
    local line file rest name
    [ -f "$dep_file" ] || die "$dep_file not found (was depmod run?)"
    while IFS= read -r line; do
        file="${line%%:*}"
        rest="${line#*:}"
        deps["$file"]="$rest"
        name="${file##*/}"
        name="${name%%.ko*}"
        by_name["${name//-/_}"]="$file"
    done <"$dep_file"

    _visit() {
        local f="$1" d
        [ -n "${seen[$f]:-}" ] && return 0
        seen["$f"]=1
        for d in ${deps[$f]}; do
            _visit "$d"
        done
        printf '%s\n' "$f"
    }
    local m key
    for m in "$@"; do
        key="${m//-/_}"
        if [ -n "${by_name[$key]:-}" ]; then
            _visit "${by_name[$key]}"
        elif grep -qE "/${m}\.ko$" "$builtin_file" 2>/dev/null || [ "$lenient" = 1 ]; then
            continue
        else
            die "module $m not found for kernel $release"
        fi
    done
}

# Modules the tests load often, stored decompressed in the cache: the
# guest's modprobe (kmod 30 on bookworm) decompresses .ko.xz in user space,
# which takes seconds per module under emulation.
KERNEL_UNPACKED_MODULES=(ublk_drv ext4 xfs loop dm-mod dm-thin-pool dm-snapshot dm-flakey null_blk brd virtio_rng virtio_blk)

kernel_unpack_modules() {
    local kdir="$1" release="$2" key f mods
    key="$(printf '%s\n' "${KERNEL_UNPACKED_MODULES[@]}" | sha256sum | cut -d' ' -f1)"
    [ "$(cat "$kdir/unpacked-modules.key" 2>/dev/null)" = "$key" ] && return 0
    mods="$(modules_closure --lenient "$kdir/tree" "$release" "${KERNEL_UNPACKED_MODULES[@]}")" \
        || die "cannot list the modules to decompress for $release"
    while IFS= read -r f; do
        case "$f" in
            *.ko.xz | *.ko.zst | *.ko.gz)
                decompress_module "$kdir/tree/lib/modules/$release/$f" "$kdir/tree/lib/modules/$release/${f%.*}" \
                    || die "cannot decompress $f"
                rm -f "$kdir/tree/lib/modules/$release/$f"
                ;;
        esac
    done <<<"$mods"
    depmod -b "$kdir/tree" "$release" || die "depmod failed for $release"
    printf '%s\n' "$key" >"$kdir/unpacked-modules.key.tmp"
    mv "$kdir/unpacked-modules.key.tmp" "$kdir/unpacked-modules.key"
}

# kernel_prepare_locked SERIES REFRESH: make sure a kernel of SERIES is cached.
kernel_prepare_locked() {
    local release
    kernel_ensure_cached "$@"
    release="$(sed -n 's/^KERNEL_RELEASE=//p' "$KERNELS_DIR/$1.env")"
    kernel_unpack_modules "$KERNELS_DIR/$release" "$release"
}

kernel_ensure_cached() {
    local series="$1" refresh="$2" pointer cached=""
    KERNELS_DIR="$(vm_cache_dir)/kernels"
    mkdir -p "$KERNELS_DIR" || die "cannot create $KERNELS_DIR"
    pointer="$KERNELS_DIR/$series.env"
    kernel_series_info "$series"
    if [ -f "$pointer" ]; then
        cached="$(sed -n 's/^KERNEL_RELEASE=//p' "$pointer")"
        kernel_cached_ok "$cached" || cached=""
    fi
    if [ -n "$cached" ] && [ "$refresh" != 1 ]; then
        return 0
    fi

    apt_private_init
    if ! apt_private_update; then
        if [ -n "$cached" ]; then
            warn "cannot reach the Debian archive; using the cached kernel $cached"
            return 0
        fi
        grep -E '^(E|W|Err):' "$APT_UPDATE_LOG" >&2 || cat "$APT_UPDATE_LOG" >&2
        die "cannot update the package lists for $SERIES_SUITE from $(debian_mirror) (set SNAPBLK_DEBIAN_MIRROR to use another mirror)"
    fi
    if ! kernel_resolve "$series"; then
        [ -n "$cached" ] && { warn "using the cached kernel $cached"; return 0; }
        die "cannot resolve the current $series kernel in $SERIES_SUITE"
    fi
    if [ "$RES_RELEASE" = "$cached" ]; then
        return 0
    fi
    if ! kernel_fetch "$series"; then
        [ -n "$cached" ] && { warn "using the cached kernel $cached"; return 0; }
        die "cannot fetch kernel $RES_RELEASE"
    fi
    cp "$KERNELS_DIR/$RES_RELEASE/kernel.env" "$pointer.tmp" && mv "$pointer.tmp" "$pointer" \
        || die "cannot write $pointer"
    kernel_prune
}

# kernel_prepare SERIES [REFRESH]: sets KERNEL_DIR, KERNEL_RELEASE,
# KERNEL_TREE, KERNEL_IMAGE (and the other KERNEL_* fields of kernel.env).
kernel_prepare() {
    local series="$1" refresh="${2:-0}"
    with_cache_lock kernel_prepare_locked "$series" "$refresh"
    KERNELS_DIR="$(vm_cache_dir)/kernels"
    # shellcheck source=/dev/null
    . "$KERNELS_DIR/$series.env"
    KERNEL_DIR="$KERNELS_DIR/$KERNEL_RELEASE"
    KERNEL_TREE="$KERNEL_DIR/tree"
    KERNEL_IMAGE="$KERNEL_TREE/$KERNEL_VMLINUZ"
    [ -f "$KERNEL_IMAGE" ] || die "cached kernel image $KERNEL_IMAGE is missing; remove $KERNEL_DIR and retry"
}
