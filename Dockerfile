# The snapblk image: one static binary for the CSI controller, the node plugin and the
# volume daemons it starts, plus the tools the node plugin runs.
#
#   docker build -t registry.example.com/snapblk:0.1.0 .
#
# Not built by the project's tests (no container engine there); the build stage's command
# is the one checked on the host: a glibc binary linked statically (static-pie), whose
# `csi ... --help` runs and which `ldd` reports as statically linked.
#
# Why glibc static rather than musl: libublk's -sys crate runs bindgen, which needs
# libclang and the kernel's UAPI headers (asm/ioctl.h, linux/*.h). Debian keeps those for
# the glibc target (linux-libc-dev, /usr/include/x86_64-linux-gnu); a musl target would need
# extra include paths for clang and the musl-tools package. The final stage is the same
# Debian release as the build stage, so the glibc that getaddrinfo may load NSS modules
# from (resolving the controller's Service name) matches the one linked in.

# ---- build ------------------------------------------------------------------------------
FROM docker.io/library/rust:1.95-bookworm AS build

# bindgen (libublk-rs-sys): libclang; the kernel UAPI headers come with the image
# (linux-libc-dev). protoc is vendored by the build (protoc-bin-vendored).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev clang \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# crt-static with the gnu target gives a static-pie binary. Debug info is dropped from
# the image (the release profile keeps line tables for local profiling).
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN TARGET="$(rustc -vV | sed -n 's/^host: //p')" \
    && cargo build --release --locked --target "$TARGET" --bin snapblk \
    && cp "target/$TARGET/release/snapblk" /snapblk \
    && (ldd /snapblk 2>&1 | grep -Eq 'not a dynamic executable|statically linked')

# ---- image ------------------------------------------------------------------------------
FROM docker.io/library/debian:bookworm-slim

# What the node plugin runs: mount and blkid/blockdev (mount, util-linux), mkfs.ext4 and
# resize2fs (e2fsprogs), mkfs.xfs and xfs_growfs (xfsprogs), modprobe for the init
# container that loads ublk_drv (kmod). The controller needs none of them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        util-linux mount e2fsprogs xfsprogs kmod \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /snapblk /usr/local/bin/snapblk

# The node plugin starts `snapblk serve` for each volume from its own path
# (/proc/self/exe), so the binary must stay where it is.
ENTRYPOINT ["/usr/local/bin/snapblk"]
CMD ["--help"]

LABEL org.opencontainers.image.title="snapblk" \
      org.opencontainers.image.description="Kubernetes volumes as Linux ublk block devices with instant snapshots (CSI driver csi.snapblk.io)" \
      org.opencontainers.image.licenses="Apache-2.0"
