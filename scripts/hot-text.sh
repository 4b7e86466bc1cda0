#!/usr/bin/env bash
# Hot/cold text layout of bosun-runc (see runtime/build.rs):
#
#   bash scripts/hot-text.sh          # trace the commands, rewrite runtime/hot-text.ld
#   bash scripts/hot-text.sh check    # trace, report executed code outside .text.hot
#
# Builds bosun-runc in release mode with a linker map, runs the lifecycle
# benchmark's create/start/delete of a /bin/true container (and state, exec,
# kill, features on a running one) under scripts/hot-text/first-hit, which
# records every function each process enters, and turns that into glob
# patterns by section name (scripts/hot-text/order.py). Rerun it after a
# dependency or toolchain update when `check` fails or the benchmark's peak
# RSS grows. Needs root (real containers), gcc, python3 and a static busybox:
# scripts/setup.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-generate}
case "$mode" in
  generate | check) ;;
  *)
    echo "usage: $0 [generate|check]" >&2
    exit 2
    ;;
esac
if [ "$(id -u)" -ne 0 ]; then
  echo "hot-text: must run as root (it runs containers)" >&2
  exit 1
fi

work=$(mktemp -d /tmp/bosun-hot-text.XXXXXX)
root=$work/root
bin=
cleanup() {
  if [ -n "$bin" ] && [ -d "$root" ]; then
    for id in hot-bench hot-other; do
      "$bin" --root "$root" delete --force "$id" >/dev/null 2>&1 || true
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> building bosun-runc (release)"
# runtime/build.rs has the linker write its map into the build script's
# OUT_DIR; cargo's messages say where that is, and where the binary is. A
# fresh link makes sure that binary and map belong together (`cargo bench`
# builds its own bosun-runc to the same path).
touch runtime/build.rs
cargo build --release --locked -p bosun-runtime --bin bosun-runc \
  -p bosun-testsupport --bin bosun-testimage \
  --message-format=json-render-diagnostics >"$work/build.json"
read -r bin testimage out_dir < <(python3 scripts/hot-text/order.py artifacts "$work/build.json")
map=$out_dir/bosun-runc.map
if [ ! -f "$map" ] || [ ! -x "$bin" ] || [ ! -x "$testimage" ]; then
  echo "hot-text: no linker map at $map" >&2
  exit 1
fi
cp "$map" "$work/map.txt"
target_dir=${bin%/x86_64-unknown-linux-gnu/release/bosun-runc}

gcc -O2 -Wall -o "$work/first-hit" scripts/hot-text/first-hit.c
python3 scripts/hot-text/order.py addrs "$work/map.txt" "$work/addrs"

# The test suite's (and the benchmark's) busybox bundle running /bin/true,
# and one with a sleeper for the other commands.
"$testimage" bundle "$work/true" -- /bin/true
"$testimage" bundle "$work/sleep" -- sleep 60

mkdir -p "$work/traces" "$root"
trace() {
  local name=$1
  shift
  "$work/first-hit" "$work/addrs" "$work/traces/$name.trace" "$bin" --root "$root" "$@"
}
wait_status() {
  local id=$1 want=$2
  for _ in $(seq 300); do
    if "$bin" --root "$root" state "$id" 2>/dev/null | grep -q "\"status\": \"$want\""; then
      return 0
    fi
    sleep 0.1
  done
  echo "hot-text: container $id never became $want" >&2
  exit 1
}

echo "==> tracing create, start, delete"
# As under `cargo bench`, which sets LD_LIBRARY_PATH (static glibc's start-up
# parses it). The container's init stays traced by the create's tracer until
# it execs the user process, which `start` releases; that tracer then reaps
# it, as the benchmark does, before `delete`.
export LD_LIBRARY_PATH=$target_dir/release/deps
trace bench-create create --bundle "$work/true" hot-bench &
create_tracer=$!
wait_status hot-bench created
trace bench-start start hot-bench
wait "$create_tracer"
trace bench-delete delete hot-bench
unset LD_LIBRARY_PATH

echo "==> tracing state, exec, kill, features"
"$bin" --root "$root" create --bundle "$work/sleep" hot-other
"$bin" --root "$root" start hot-other
trace other-state state hot-other >/dev/null
trace other-exec exec hot-other /bin/true
trace other-kill kill hot-other KILL
wait_status hot-other stopped
trace other-delete delete hot-other
trace other-features features >/dev/null

if [ "$mode" = check ]; then
  echo "==> executed code outside .text.hot (runtime/hot-text.ld)"
  if ! python3 scripts/hot-text/order.py check "$work/map.txt" "$work/traces"; then
    echo "hot-text: runtime/hot-text.ld no longer matches the code: run scripts/hot-text.sh" >&2
    exit 1
  fi
else
  echo "==> writing runtime/hot-text.ld"
  python3 scripts/hot-text/order.py script "$work/map.txt" "$work/traces" runtime/hot-text.ld
  echo "rebuild (cargo build --release) to link with it"
fi
