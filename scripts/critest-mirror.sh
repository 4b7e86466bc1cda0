#!/usr/bin/env bash
# A local registry serving stand-ins for the images critest (cri-tools'
# validation suite) pulls, under their upstream repository paths, so the
# suite runs without the internet. The stand-ins are built from Debian's
# busybox by `bosun-testimage critest-images` (tests/support/src/critest.rs).
#
#   scripts/critest-mirror.sh [DIR]        (default DIR: /tmp/bosun-critest-mirror)
#   scripts/critest-mirror.sh --stop [DIR]
#
# The registry listens where the script runs: for a daemon in a node network
# namespace, run it there (`nsenter --net=/run/netns/node scripts/...`).
#
# Env: PORT (5000) on 127.0.0.1; BIN, the dir holding bosun-testimage,
# bosun-nnp-probe and bosun-pause (default: this tree's release build,
# built if missing).
#
# Writes, for the runtime under test:
#   DIR/registry-hosts.json   bosun-cri's registry_hosts (every registry
#                             critest names → the mirror, plain HTTP)
#   DIR/containerd-cri.toml   the same as containerd 1.6 CRI plugin mirrors,
#                             plus sandbox_image (merge into its config.toml)
set -euo pipefail

stop=false
if [ "${1:-}" = "--stop" ]; then stop=true; shift; fi
dir=${1:-/tmp/bosun-critest-mirror}
port=${PORT:-5000}
here=$(cd "$(dirname "$0")/.." && pwd)
mirror=127.0.0.1:$port
registries=(registry.k8s.io k8s.gcr.io gcr.io docker.io)

if $stop; then
  if [ -f "$dir/registry.pid" ]; then kill "$(cat "$dir/registry.pid")" 2>/dev/null || true; fi
  rm -f "$dir/registry.pid"
  exit 0
fi

for tool in docker-registry skopeo; do
  command -v "$tool" >/dev/null || { echo "critest-mirror: $tool missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

if [ -z "${BIN:-}" ]; then
  BIN=${CARGO_TARGET_DIR:-$here/target}/x86_64-unknown-linux-gnu/release
  if [ ! -x "$BIN/bosun-testimage" ] || [ ! -x "$BIN/bosun-nnp-probe" ] || [ ! -x "$BIN/bosun-pause" ]; then
    (cd "$here" && cargo build --release -q -p bosun-testsupport)
  fi
fi

mkdir -p "$dir/storage"
cat > "$dir/registry.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: $mirror
EOF

if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  setsid docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 < /dev/null &
  echo $! > "$dir/registry.pid"
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "critest-mirror: registry did not listen on $mirror" >&2; cat "$dir/registry.log" >&2; exit 1; }
fi

rm -rf "$dir/layout"
"$BIN/bosun-testimage" critest-images "$dir/layout" > "$dir/images.txt"
while read -r tag reference; do
  path=${reference#*/}   # drop the registry host: the mirror serves them all
  skopeo copy --quiet --insecure-policy --dest-tls-verify=false \
    "oci:$dir/layout:$tag" "docker://$mirror/$path"
  echo "critest-mirror: $reference -> $mirror/$path"
done < "$dir/images.txt"

{
  printf '{"host": {'
  sep=
  for r in "${registries[@]}"; do
    printf '%s"%s": [{"host": "%s", "plain_http": true}]' "$sep" "$r" "$mirror"
    sep=', '
  done
  printf '}}\n'
} > "$dir/registry-hosts.json"

{
  echo '[plugins."io.containerd.grpc.v1.cri"]'
  echo '  sandbox_image = "registry.k8s.io/pause:3.6"'
  echo '  restrict_oom_score_adj = true   # root here lacks CAP_SYS_RESOURCE'
  for r in "${registries[@]}"; do
    echo "  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"$r\"]"
    echo "    endpoint = [\"http://$mirror\"]"
  done
} > "$dir/containerd-cri.toml"

echo "critest-mirror: serving on $mirror; bosun-cri: registry_hosts = \"$dir/registry-hosts.json\""
