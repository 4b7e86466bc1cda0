#!/usr/bin/env bash
# The main job, from a fresh Debian machine: install what is needed, build, and
# run a busybox container with bosun-runc — its output, a memory and a pids
# limit applied inside it, and the clean-up afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "==> building bosun-runc (release)"
cargo build --release --locked -p bosun-runtime -p bosun-testsupport

bin=target/x86_64-unknown-linux-gnu/release
runc=$bin/bosun-runc
work=$(mktemp -d /tmp/bosun-demo.XXXXXX)
root="$work/state"
id="demo-$$"
cleanup() {
  "$runc" --root "$root" delete --force "$id" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> building a busybox bundle in $work/bundle"
"$bin/bosun-testimage" bundle "$work/bundle" -- sh -c '
  echo "hello from $(hostname), pid $$ in its own pid namespace"
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
# 64 MiB of memory and at most 8 processes.
tmp=$(mktemp)
jq '.linux.resources.memory = {"limit": 67108864} | .linux.resources.pids = {"limit": 8}' \
  "$work/bundle/config.json" >"$tmp" && mv "$tmp" "$work/bundle/config.json"

echo "==> bosun-runc run $id"
set +e
"$runc" --root "$root" run --bundle "$work/bundle" "$id" </dev/null
status=$?
set -e
echo "==> container exited with status $status (expected 3)"

echo "==> after the run: containers left = $("$runc" --root "$root" list --quiet | wc -l)," \
  "cgroups left = $(find /sys/fs/cgroup -maxdepth 2 -name "$id" 2>/dev/null | wc -l)"
[ "$status" -eq 3 ]
