#!/usr/bin/env bash
# The basic blocks of a kernel's machine code (SASS) that hold tensor-core mmas, without a GPU:
# where a loop's mmas sit in one straight-line block, ptxas can issue the ldmatrix loads of
# later steps while earlier mmas run; where a branch (a per-step exit, a per-element test) cuts
# them into blocks of two, each block waits out its own loads. This is how the attention
# forward's fall from 134.6 to 105.8 TFLOP/s at D = 128 (H200, 2026-11-30 to 2026-12-04) was
# traced to its per-step exits (kernels/attention_fwd.cu, the tile body compiled twice), with
# no GPU at hand.
#
# Usage: scripts/sass-blocks.sh KERNEL_FILE [FUNCTION_REGEX] [MIN_MMAS] [ARCH]
#   e.g. scripts/sass-blocks.sh kernels/attention_fwd.cu 'attn_fwd_mma_bf16_h128$'
# Prints, per function, its instruction and mma counts (registers: scripts/ptxas-report.sh), and
# every block with at least MIN_MMAS (default 8) mmas: its address, instructions, mmas, shared
# memory matrix loads (LDSM), special-function ops (MUFU) and how it ends.
# Needs the CUDA toolchain (scripts/install-cuda-toolchain.sh) and, for the disassembler,
# cuobjdump and nvdisasm, which this installs from PyPI on first use (~60 MB, into
# $TEMPER_CUDA_HOME/tools).
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: scripts/sass-blocks.sh KERNEL_FILE [FUNCTION_REGEX] [MIN_MMAS] [ARCH]}"
pattern="${2:-.}"
min="${3:-8}"
arch="${4:-90}"
eval "$(scripts/install-cuda-toolchain.sh --env)"
tools="${TEMPER_CUDA_HOME:-$HOME/.cache/temper/cuda13}/tools"
bin="$tools/nvidia/cu13/bin"
if [[ ! -x "$bin/cuobjdump" || ! -x "$bin/nvdisasm" ]]; then
  echo "installing cuobjdump and nvdisasm from PyPI into $tools" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tools" \
    nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
  chmod +x "$bin"/* 2>/dev/null || true
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# build.rs's flags (its warnings are build.rs's to show): shown only if the build fails.
nvcc --cubin -arch="sm_$arch" -O3 -std=c++17 -I kernels -o "$work/k.cubin" "$src" 2>"$work/nvcc.log" ||
  { cat "$work/nvcc.log" >&2; exit 1; }
PATH="$bin:$PATH" cuobjdump -sass "$work/k.cubin" >"$work/k.sass"
python3 - "$work/k.sass" "$pattern" "$min" <<'EOF'
import collections, re, sys
path, pattern, least = sys.argv[1], re.compile(sys.argv[2]), int(sys.argv[3])
funcs, cur = {}, None
for line in open(path):
    m = re.search(r"Function : (\S+)", line)
    if m:
        cur = m.group(1)
        funcs[cur] = []
        continue
    m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
    if cur and m:
        funcs[cur].append((int(m.group(1), 16), m.group(2).strip()))
def opcode(ins):
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]
for name in sorted(f for f in funcs if pattern.search(f)):
    ins = funcs[name]
    targets = {int(m.group(1), 16) for _, i in ins if "BRA" in i for m in [re.search(r"0x([0-9a-f]+)", i)] if m}
    blocks, block = [], []
    for addr, i in ins:
        if addr in targets and block:
            blocks.append(block)
            block = []
        block.append((addr, i))
        if opcode(i) in ("BRA", "EXIT", "RET"):
            blocks.append(block)
            block = []
    if block:
        blocks.append(block)
    total = collections.Counter(opcode(i) for _, i in ins)
    print(f"{name}: {len(ins)} instructions, {total['HMMA']} mmas, {len(blocks)} blocks")
    for b in blocks:
        c = collections.Counter(opcode(i) for _, i in b)
        if c["HMMA"] >= least:
            print(f"  {b[0][0]:#07x}: {len(b):4d} instructions, {c['HMMA']:3d} mmas, "
                  f"{c['LDSM']:3d} LDSM, {c['MUFU']:3d} MUFU; ends {b[-1][1].split('/*')[0].strip()}")
EOF
