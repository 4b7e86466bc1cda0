#!/usr/bin/env bash
# Installs every Debian package the build, the main job and the tests need.
# Idempotent; run as root on Debian bookworm.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (apt-get install)" >&2
  exit 1
fi

packages=(
  # build
  build-essential pkg-config libseccomp-dev libclang-dev clang protobuf-compiler
  # test images and bundles
  busybox-static jq
  # OCI runtimes we compare against and real clients that drive ours
  runc crun podman containerd skopeo umoci
  # kernel-side tools
  iproute2 iptables nftables procps psmisc util-linux
  # registry for image tests
  docker-registry apache2-utils openssl
  # CNI reference plugins (podman's CNI backend and chaining tests)
  containernetworking-plugins
  # benchmarks; python3 for scripts/hot-text.sh (bosun-runc's text layout)
  time python3
  # VM tests: a Debian kernel booted under QEMU (TCG) with a busybox initramfs
  qemu-system-x86 linux-image-amd64 cpio
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages present"
fi
