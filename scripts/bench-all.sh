#!/usr/bin/env bash
# Runs temper's kernel benches and their PyTorch peers on the device machine in one call, and
# ends with one table of ratios (ours / theirs). Build first, on the build machine:
#   scripts/gpu-build.sh            # packs the bench binaries into .gpu/
# then, on the device (repository root, .gpu carried along):
#   scripts/bench-all.sh            # full logs and the JSON lines go under $OUT (or a temp dir)
#
# Each bench prints human-readable lines and one JSON object per measurement
# ({"bench": "attention" | "lora" | "gae" | "copy" | "generate", ...}); the table is built
# from those.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOGDIR="${OUT:-$(mktemp -d)}"
mkdir -p "$LOGDIR"
status=0

run() {
  local name="$1"
  shift
  echo "== $name" >&2
  if ! "$@" >"$LOGDIR/$name.txt" 2>"$LOGDIR/$name.err"; then
    echo "   $name failed (see $LOGDIR/$name.err):" >&2
    tail -n 5 "$LOGDIR/$name.err" >&2
    status=1
  fi
  grep -v '^{' "$LOGDIR/$name.txt" >&2 || true
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv >&2 || true
if [[ -x .gpu/run-on-device.sh ]]; then
  for b in attention lora gae generate; do
    if .gpu/run-on-device.sh list | grep -qx "bench-$b"; then
      run "bench-$b" .gpu/run-on-device.sh "bench-$b" --bench
    else
      echo "bench-$b is not in .gpu/ (scripts/gpu-build.sh builds it)" >&2
    fi
  done
else
  echo "no .gpu/run-on-device.sh: run scripts/gpu-build.sh on the build machine and carry .gpu" >&2
  status=1
fi
run peers python3 scripts/bench_peers.py
run peer-generate python3 scripts/bench_generate.py

cat "$LOGDIR"/*.txt | grep '^{' >"$LOGDIR/all.jsonl" || true
python3 - "$LOGDIR/all.jsonl" <<'PY'
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]

def pick(**kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None

def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"

print()
print("attention, causal bf16: TFLOP/s (ratio = ours / peer)")
print(f"{'shape':<22} {'pass':<8} {'ours':>7} {'ref':>7} {'flash':>7} {'cudnn':>7} {'/flash':>7} {'/cudnn':>7}")
for shape in sorted({r["shape"] for r in rows if r.get("bench") == "attention"}):
    for p in ["fwd", "fwd+bwd"]:
        get = lambda impl: (pick(bench="attention", shape=shape, impl=impl, **{"pass": p}) or {}).get("tflops")
        ours, ref, fl, cu = get("ours-mma"), get("reference"), get("torch-flash"), get("torch-cudnn")
        rf = ours / fl if ours and fl else None
        rc = ours / cu if ours and cu else None
        print(f"{shape:<22} {p:<8} {fmt(ours, '7.1f')} {fmt(ref, '7.1f')} {fmt(fl, '7.1f')} {fmt(cu, '7.1f')} {fmt(rf, '7.2f')} {fmt(rc, '7.2f')}")

print()
print("lora, bf16: time over the plain GEMM of the same shape (lower is better)")
print(f"{'shape':<24} {'':<8} {'ours':>7} {'ours-ref':>9} {'torch':>7}")
for shape in sorted({r["shape"] for r in rows if r.get("bench") == "lora"}):
    for key, label in [("fwd_x", "fwd"), ("fwd_bwd_x", "fwd+bwd")]:
        get = lambda impl: (pick(bench="lora", shape=shape, impl=impl) or {}).get(key)
        print(f"{shape:<24} {label:<8} {fmt(get('fused'), '6.2f')}x {fmt(get('reference'), '8.2f')}x {fmt(get('torch-unfused'), '6.2f')}x")

print()
print("gae: milliseconds")
for r in rows:
    if r.get("bench") == "gae":
        print(f"  {r.get('shape', ''):<14} {r.get('impl', ''):<18} {fmt(r.get('ms'), '9.3f')} ms")

print()
print("generate, GPT-2 small bf16, 64 prompts x 256 tokens, 128 new at T=0.7: tokens/s")
ours = pick(bench="generate", impl="temper") or {}
hf = pick(bench="generate", impl="hf-transformers") or {}
t, h = ours.get("tokens_per_s"), hf.get("tokens_per_s")
print(f"  temper {fmt(t, '10.0f')}   transformers {fmt(h, '10.0f')}   ratio {fmt(t / h if t and h else None, '.2f')}x")
print(f"  decode step: temper {fmt(ours.get('ms_decode_step'), '.3f')} ms, transformers {fmt(hf.get('ms_decode_step'), '.3f')} ms, "
      f"bandwidth floor {fmt(ours.get('ms_floor_step'), '.3f')} ms ({fmt(ours.get('floor_tokens_per_s'), '.0f')} tokens/s)")
if hf.get("error"):
    print(f"  transformers peer: {hf['error']}")
for r in rows:
    if r.get("bench") == "copy":
        print(f"device-to-device copy: {fmt(r.get('gbps'), '.0f')} GB/s (read + write)")
for r in rows:
    if r.get("bench") == "device":
        print(f"device: {r.get('name')} (torch {r.get('torch')}, CUDA {r.get('cuda')})")
PY
echo "logs: $LOGDIR" >&2
exit "$status"
