#!/usr/bin/env bash
# Runs temper's CUDA kernels on the CPU, in the emulator of tests/kernel_emu/, against their
# references: the check of a kernel's indexing, tiling, masking and mma fragment layouts that
# needs no GPU (what it cannot show is in tests/kernel_emu/cuda_emu.h). Each driver
# tests/kernel_emu/*.cpp is built with g++ against a copy of kernels/ in which
# tests/kernel_emu/mma_ptx.cuh replaces the PTX primitives, then run twice with the same seed:
# once with the first warp of each block running ahead of the others, once with the last.
#
# Usage: scripts/kernel-emu.sh [SEED] [DRIVER...]   (a random seed when none is given; the
# drivers' names without .cpp, all of them by default). Needs g++ 12 or newer (_Float16).
# Builds into $TEMPER_EMU_DIR, default $CARGO_TARGET_DIR/kernel-emu (or target/kernel-emu).
set -euo pipefail
cd "$(dirname "$0")/.."
seed="${1:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
shift || true
drivers=("$@")
if [[ ${#drivers[@]} -eq 0 ]]; then
  for src in tests/kernel_emu/*.cpp; do drivers+=("$(basename "$src" .cpp)"); done
fi
out="${TEMPER_EMU_DIR:-${CARGO_TARGET_DIR:-target}/kernel-emu}"
mkdir -p "$out"
overlay="$(mktemp -d "$out/kernels.XXXXXX")"
trap 'rm -rf "$overlay"' EXIT
cp kernels/* "$overlay/"
cp tests/kernel_emu/mma_ptx.cuh "$overlay/"

# Build every driver first, as many at once as there are cores.
# -fno-extern-tls-init: __shared__ is thread_local in the emulator, and a kernel's
# `extern __shared__` array is defined by the driver without a dynamic initializer.
# -fsanitize=undefined: a kernel's undefined behaviour stops the run at its line. Above all
# the alignment check: a Vec16 (16-byte) load from an address the GPU would fault on, which
# an x86 CPU would otherwise load without complaint.
ubsan=(-fsanitize=undefined -fno-sanitize-recover=all)
if ! echo 'int main() { return 0; }' | g++ -x c++ "${ubsan[@]}" - -o "$overlay/ubsan-probe" 2>/dev/null; then
  echo "kernel emulator: WARNING: g++ cannot link -fsanitize=undefined (libubsan missing);" \
    "misaligned vector loads go unchecked" >&2
  ubsan=()
fi
printf '%s\n' "${drivers[@]}" | xargs -P "$(nproc)" -I{} \
  g++ -std=c++17 -O1 -fno-extern-tls-init ${ubsan[@]+"${ubsan[@]}"} -include tests/kernel_emu/cuda_emu.h \
  -I tests/kernel_emu/include -I "$overlay" -I tests/kernel_emu \
  "tests/kernel_emu/{}.cpp" -o "$out/{}"

# Then run each driver in both orders at once (one core each), printing the logs in turn.
failed=0
for name in "${drivers[@]}"; do
  pids=()
  for order in forward reverse; do
    EMU_ORDER="$order" "$out/$name" "$seed" >"$out/$name.$order.log" 2>&1 &
    pids+=($!)
  done
  for i in 0 1; do
    order=$([[ $i -eq 0 ]] && echo forward || echo reverse)
    status=0
    wait "${pids[$i]}" || status=$?
    echo "== $name (seed $seed, $order warp order)"
    cat "$out/$name.$order.log"
    [[ $status -eq 0 ]] || failed=1
  done
done
if [[ $failed -ne 0 ]]; then
  echo "kernel emulator: FAILED (rerun: scripts/kernel-emu.sh $seed)" >&2
  exit 1
fi
echo "kernel emulator: all drivers passed"
