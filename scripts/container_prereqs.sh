#!/usr/bin/env bash
# Install what the container test (tests/docker) needs and make its local base image. Idempotent.
#   - podman, runc and debootstrap from Debian's packages (needs root and apt-get);
#   - localhost/gpt-oss-base:bookworm: Debian bookworm (Python 3.11) made with debootstrap, standing
#     in for python:3.11-slim where no image registry can be reached. The root filesystem is cached
#     as a tarball in $GPT_OSS_CACHE_DIR (default ~/.cache/gpt-oss-server), so a machine debootstraps
#     once and later runs only `podman import` it (seconds).
# Usage: bash scripts/container_prereqs.sh     (prints how long each step took)
set -euo pipefail

BASE_IMAGE=${GPT_OSS_TEST_BASE_IMAGE:-localhost/gpt-oss-base:bookworm}
CACHE_DIR=${GPT_OSS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpt-oss-server}
ROOTFS_TAR="$CACHE_DIR/bookworm-python3-rootfs.tar"

step() { echo "== container prereqs: $*"; }
took() { echo "   ($(($(date +%s) - $1)) s)"; }

missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]} (apt-get)"
  start=$(date +%s)
  if [ "$(id -u)" -ne 0 ]; then
    echo "container prereqs: need root to install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman runc debootstrap >/dev/null
  took "$start"
fi

if podman image exists "$BASE_IMAGE"; then
  step "$BASE_IMAGE is there"
  exit 0
fi

if [ ! -s "$ROOTFS_TAR" ]; then
  step "debootstrap bookworm (python3, python3-venv) -> $ROOTFS_TAR"
  start=$(date +%s)
  mkdir -p "$CACHE_DIR"
  rootfs=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" >/dev/null
  # Keep the image lean, like python:3.11-slim: no package lists or caches.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -cf "$ROOTFS_TAR.partial" .
  mv "$ROOTFS_TAR.partial" "$ROOTFS_TAR"
  took "$start"
fi

step "podman import $ROOTFS_TAR -> $BASE_IMAGE"
start=$(date +%s)
podman import --quiet --change 'CMD ["/bin/bash"]' "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
took "$start"
