#!/usr/bin/env bash
# The main job, from a fresh Debian machine: install what is needed, build, and
# run a busybox container with bosun-runc, networked by bosun-cni — its output,
# its pod addresses and a ping to its gateway, a memory and a pids limit
# applied inside it, and the clean-up afterwards. The bridge lives in a "node"
# network namespace made for the demo, never in the host's own.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "==> building bosun-runc and bosun-cni (release)"
cargo build --release --locked -p bosun-runtime -p bosun-testsupport -p bosun-cni

bin=target/x86_64-unknown-linux-gnu/release
runc=$bin/bosun-runc
cni=$(realpath "$bin/bosun-cni")
work=$(mktemp -d /tmp/bosun-demo.XXXXXX)
root="$work/state"
id="demo-$$"
node="bosun-demo-node-$$"
pod="bosun-demo-pod-$$"
netconf="$work/net.json"
cni_call() {
  ip netns exec "$node" env CNI_COMMAND="$1" CNI_CONTAINERID="$id" \
    CNI_NETNS="/run/netns/$pod" CNI_IFNAME=eth0 "$cni" <"$netconf"
}
cleanup() {
  "$runc" --root "$root" delete --force "$id" >/dev/null 2>&1 || true
  cni_call DEL >/dev/null 2>&1 || true
  ip netns del "$pod" 2>/dev/null || true
  ip netns del "$node" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> bosun-cni ADD: pod namespace $pod, bridge demo0 in node namespace $node"
ip netns add "$node"
ip netns add "$pod"
jq -n --arg ipam "$work/ipam" '{
  cniVersion: "1.1.0", name: "demo", type: "bosun-cni", bridge: "demo0",
  isGateway: true, isDefaultGateway: true, ipMasq: true,
  ipam: {type: "host-local", dataDir: $ipam,
         ranges: [[{subnet: "10.250.0.0/24"}], [{subnet: "fd00:250::/64"}]]}}' >"$netconf"
cni_call ADD | jq -c '{ips: [.ips[].address], interfaces: [.interfaces[].name]}'

echo "==> building a busybox bundle in $work/bundle"
"$bin/bosun-testimage" bundle "$work/bundle" -- sh -c '
  echo "hello from $(hostname), pid $$ in its own pid namespace"
  echo "pod addresses on eth0: $(ip -o addr show eth0 scope global | while read -r _ _ _ a _; do printf "%s " "$a"; done)"
  echo "ping gateway 10.250.0.1: $(ping -c 1 -W 2 10.250.0.1 | grep -o "[0-9]* packets received")"
  if [ -f /sys/fs/cgroup/memory.max ]; then
    echo "memory limit (cgroup v2): $(cat /sys/fs/cgroup/memory.max)"
    echo "pids limit   (cgroup v2): $(cat /sys/fs/cgroup/pids.max)"
  else
    echo "memory limit (cgroup v1): $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
    echo "pids limit   (cgroup v1): $(cat /sys/fs/cgroup/pids/pids.max)"
  fi
  ok=0
  for i in 1 2 3 4 5 6 7 8 9 10 11 12; do
    if (sleep 3 &) 2>/dev/null; then ok=$((ok+1)); fi
  done
  echo "pids limit enforced: $ok of 12 background forks allowed"
  exit 3'
# 64 MiB of memory and at most 8 processes; the pod's network namespace, and
# CAP_NET_RAW for ping.
tmp=$(mktemp)
jq --arg netns "/run/netns/$pod" '
  .linux.resources.memory = {"limit": 67108864} | .linux.resources.pids = {"limit": 8}
  | .linux.namespaces |= map(if .type == "network" then .path = $netns else . end)
  | .process.capabilities |= with_entries(.value += ["CAP_NET_RAW"])' \
  "$work/bundle/config.json" >"$tmp" && mv "$tmp" "$work/bundle/config.json"

echo "==> bosun-runc run $id"
set +e
"$runc" --root "$root" run --bundle "$work/bundle" "$id" </dev/null
status=$?
set -e
echo "==> container exited with status $status (expected 3)"

echo "==> bosun-cni DEL"
cni_call DEL

echo "==> after the run: containers left = $("$runc" --root "$root" list --quiet | wc -l)," \
  "cgroups left = $(find /sys/fs/cgroup -maxdepth 2 -name "$id" 2>/dev/null | wc -l)," \
  "pod IPs held = $(find "$work/ipam/demo" -maxdepth 1 -name '*[.:]*' ! -name 'last_reserved*' ! -name 'attachment*' | wc -l)," \
  "pod interfaces left = $(ip netns exec "$pod" ip -o link | grep -vc ': lo:')"
[ "$status" -eq 3 ]
