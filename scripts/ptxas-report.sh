#!/usr/bin/env bash
# Registers, spills and shared memory of every kernel in kernels/*.cu, per arch, from ptxas:
# the cheap first look before any device time is spent. Needs nvcc (see
# scripts/install-cuda-toolchain.sh). Usage: scripts/ptxas-report.sh [KERNEL_DIR] [ARCHS...]
# (defaults: kernels/, 80 90). Prints one line per kernel and arch:
#   sm_XX  <kernel>  regs=N  spill_st=B spill_ld=B  smem=B  stack=B
# and exits non-zero if any kernel spills or has a stack frame (local memory: a register
# array indexed at run time, say, which ptxas does not count as a spill).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-kernels}"
shift || true
archs=("$@")
[[ ${#archs[@]} -gt 0 ]] || archs=(80 90)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
spills=0
for cu in "$dir"/*.cu; do
  for arch in "${archs[@]}"; do
    log="$tmp/$(basename "$cu" .cu)_$arch.log"
    nvcc -cubin -arch="sm_$arch" -O3 -std=c++17 -I "$dir" -Xptxas -v -o /dev/null "$cu" 2>"$log"
    awk -v arch="sm_$arch" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); fn = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes stack frame/ {
        match($0, /[0-9]+ bytes stack frame/); frame = substr($0, RSTART, RLENGTH - 18)
        st = $0; sub(/.*stack frame, /, "", st); split(st, a, " "); sst = a[1]; sld = a[5]
      }
      /Used [0-9]+ registers/ {
        match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
        smem = 0; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
        printf "%s  %-44s regs=%-4s spill_st=%-4s spill_ld=%-4s smem=%-6s stack=%s\n", arch, fn, regs, sst, sld, smem, frame
      }' "$log"
  done
done | sort -k2,2 -k1,1 | tee "$tmp/report"
# An empty report means nvcc or the parsing failed, not that nothing spills.
if [[ ! -s "$tmp/report" ]]; then
  echo "error: ptxas reported no kernels (see nvcc's messages above)" >&2
  exit 1
fi
if awk '{ split($4, s, "="); split($5, l, "="); split($7, f, "="); if (s[2] + l[2] + f[2] > 0) bad = 1 } END { exit !bad }' "$tmp/report"; then
  echo "error: some kernel spills registers or has a stack frame (local memory)" >&2
  exit 1
fi
