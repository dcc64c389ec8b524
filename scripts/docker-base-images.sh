#!/usr/bin/env bash
# Builds the two base images the Dockerfile needs, on a machine that has no
# container registry: a Debian bookworm root filesystem from debootstrap
# (the runtime base), and the same with this machine's Rust toolchain added
# (the builder base). Prints the build arguments to use them.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/docker-base-images.sh [--help]

Creates, unless they exist:
  cluster-store-base:bookworm   Debian bookworm (debootstrap, minbase + gcc)
  cluster-store-rust:local      the same plus this machine's Rust toolchain

Then build with (docker compose v2, or docker-compose v1):
  RUST_IMAGE=cluster-store-rust:local RUNTIME_IMAGE=cluster-store-base:bookworm docker compose up --build
  RUST_IMAGE=cluster-store-rust:local RUNTIME_IMAGE=cluster-store-base:bookworm docker-compose up --build

Needs root (debootstrap), Docker, and Debian's package mirror.
Environment:
  ROOTFS_DIR   where to keep the debootstrap tree (default /var/tmp/cluster-store-rootfs)
  DEBIAN_MIRROR  (default http://deb.debian.org/debian)
USAGE
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    usage
    exit 0
fi

ROOTFS="${ROOTFS_DIR:-/var/tmp/cluster-store-rootfs}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE=cluster-store-base:bookworm
RUST=cluster-store-rust:local

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have_image "$BASE"; then
    if [[ ! -x "$ROOTFS/bin/sh" ]]; then
        if ! command -v debootstrap >/dev/null 2>&1; then
            echo "installing debootstrap" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        fi
        echo "debootstrap bookworm into $ROOTFS (a few minutes)" >&2
        rm -rf "$ROOTFS"
        debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$ROOTFS" "$MIRROR" >/dev/null
    fi
    echo "importing $BASE" >&2
    tar -C "$ROOTFS" -c . | docker import - "$BASE" >/dev/null
fi

if ! have_image "$RUST"; then
    SYSROOT="$(rustc --print sysroot)"
    if [[ ! -x "$SYSROOT/bin/cargo" ]]; then
        echo "no cargo in the toolchain at $SYSROOT" >&2
        exit 1
    fi
    # The builder fetches crates; trust what this machine trusts (a proxy's
    # CA included), as cargo here does.
    CA_BUNDLE="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
    echo "adding the Rust toolchain from $SYSROOT and the CA bundle $CA_BUNDLE as $RUST" >&2
    container="$(docker create -v "$SYSROOT:/opt/host-rust:ro" -v "$CA_BUNDLE:/opt/host-ca.crt:ro" "$BASE" \
        /bin/sh -c 'mkdir -p /usr/local/rust && cp -a /opt/host-rust/bin /opt/host-rust/lib /usr/local/rust/ && cp /opt/host-ca.crt /etc/ssl/certs/ca-certificates.crt')"
    trap 'docker rm -f "$container" >/dev/null 2>&1 || true' EXIT
    docker start -a "$container"
    docker commit --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' "$container" "$RUST" >/dev/null
fi

echo "RUST_IMAGE=$RUST RUNTIME_IMAGE=$BASE"
