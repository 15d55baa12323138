# shellcheck shell=bash
# Helpers shared by the host side of the VM test harness (sourced, not run).

msg() { printf '%s\n' "vm-tests: $*" >&2; }
warn() { printf '%s\n' "vm-tests: warning: $*" >&2; }
die() { printf '%s\n' "vm-tests: error: $*" >&2; exit 1; }

# Root of everything the harness caches between runs (kernels, initramfs,
# private apt state). Never inside the repository.
vm_cache_dir() {
    local base="${SNAPBLK_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:?HOME is not set}/.cache}/snapblk}"
    printf '%s/vm\n' "$base"
}

# Run "$@" holding an exclusive lock on the cache, so that two runs at the
# same time do not fetch or build the same thing at once.
with_cache_lock() {
    local cache lockfile fd
    cache="$(vm_cache_dir)"
    mkdir -p "$cache" || die "cannot create cache folder $cache"
    lockfile="$cache/.lock"
    exec {fd}>"$lockfile" || die "cannot open $lockfile"
    if ! flock -n "$fd"; then
        msg "waiting for another run to release $lockfile"
        flock "$fd" || die "cannot lock $lockfile"
    fi
    # Called outside any || or if, so that set -e stays in force in "$@";
    # on failure the process exits and the lock goes with it.
    "$@"
    flock -u "$fd"
    exec {fd}>&-
}

# Check that the host tools the harness itself uses are present.
require_host_tools() {
    local missing=() t
    for t in qemu-system-x86_64 cpio gzip xz depmod flock timeout dpkg apt-get apt-cache sha256sum; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    [ -x /bin/busybox ] || missing+=(busybox)
    if [ "${#missing[@]}" -gt 0 ]; then
        die "missing host tools: ${missing[*]} (run scripts/setup as root first)"
    fi
    if ldd /bin/busybox >/dev/null 2>&1; then
        die "/bin/busybox is dynamically linked; the initramfs needs busybox-static (run scripts/setup)"
    fi
}

# Format a duration given in milliseconds as seconds with one decimal.
fmt_ms() {
    local ms="$1"
    printf '%d.%ds' "$((ms / 1000))" "$(((ms % 1000) / 100))"
}

now_ms() { date +%s%3N; }
