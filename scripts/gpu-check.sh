#!/usr/bin/env bash
# Every GPU check of temper in one device call, under 8 minutes: the GPU test executables, each
# kernel bench beside its PyTorch peer, and the GPT-2 124M training step (B16 T1024 bf16)
# beside PyTorch eager (SDPA, fused AdamW) and torch.compile, with tokens/s and peak memory.
# The kernel benches: attention, LoRA, RMSNorm, GAE, the gradient all-reduce, and the
# training step's ops (bench-train_ops: LayerNorm, GELU, bias and bias + GELU, SwiGLU, RoPE, head split,
# token + position embedding, the loss head's log-probabilities, fwd and fwd+bwd; one AdamW
# step) at GPT-2 124M B16 T1024 bf16 shapes; the LoRA bench also times our cuBLASLt GEMM.
# It ends with one table of ratios, temper over its peer measured in this same run.
#
# On the build machine (no GPU needed):   scripts/gpu-build.sh      # packs .gpu/
# On the device, from the repository root, .gpu carried (it is git-ignored):
#   scripts/gpu-check.sh
# docs/GPU.md has the whole recipe; BENCHMARKS.md, how each comparison is made fair.
#
# Each section runs under its own timeout and inside an overall budget
# (TEMPER_CHECK_BUDGET_S, default 450 s), so one hang costs one section; a failed or timed-out
# section is a row in the table, not the end of the run. Sections run in order of how much
# their figure matters, so a short budget drops the least useful ones. TEMPER_CHECK_ONLY (a
# bash regex over section names, e.g. '^(device|unpack|train-ours|train-torch-eager)$') runs
# only those.
#
# Output: the table last on stdout; under $OUT when set (else a temp dir; the path is printed):
#   gpu-check.md   the table, the device, and each section's status: paste into BENCHMARKS.md
#   results.jsonl  every raw measurement, one JSON object a line, and one line per section
#   logs.txt       every section's full output
#   ncu-train-step.csv  ncu's per-kernel summary of one steady-state step of ours
#   ncu-decode-step.csv the same for one decode step of generation
#   ncu-attention.txt   ncu's detail sections for the attention kernels (last, as time allows)
# (six files: the device tool returns at most 8.)
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
DEST="${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}"
mkdir -p "$DEST"
WORK="$(mktemp -d /tmp/gpu-check-work.XXXXXX)"
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
BUDGET="${TEMPER_CHECK_BUDGET_S:-450}"
START=$SECONDS
BUNDLE=.gpu/run-on-device.sh
export PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [[ ! -x "$BUNDLE" || ! -f .gpu/bundle.tar.xz ]]; then
  cat >&2 <<'EOF'
gpu-check: no .gpu/ bundle here. Build it on a machine with Rust (no GPU needed):
    scripts/gpu-build.sh
then carry it to the device: .gpu is git-ignored, so name it in the device call's `carry`.
EOF
  exit 2
fi

# Seconds left in the budget, less a reserve for the table.
left() { echo $((BUDGET - (SECONDS - START) - 15)); }

# GPU memory in use (MiB), or nothing if nvidia-smi cannot say.
mem_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -d ' '; }

# section NAME TIMEOUT_S CMD...: runs CMD with its own timeout (cut to what the budget has
# left), keeps its output, copies its JSON lines into results.jsonl and records its status.
# With MEM=1 in the environment it also samples nvidia-smi every 100 ms and records the peak
# GPU memory of the run over what was in use before it (the process's context included), the
# one yardstick that means the same for candle's and PyTorch's allocators.
section() {
  local name="$1" limit="$2"
  shift 2
  if [[ -n "${TEMPER_CHECK_ONLY:-}" && ! "$name" =~ $TEMPER_CHECK_ONLY ]]; then
    printf '{"section":"%s","status":"skipped (TEMPER_CHECK_ONLY)"}\n' "$name" >>"$RESULTS"
    return 0
  fi
  local remaining
  remaining=$(left)
  if ((remaining < 20)); then
    echo "== $name: skipped, the ${BUDGET} s budget is spent" >&2
    printf '{"section":"%s","status":"skipped (budget)"}\n' "$name" >>"$RESULTS"
    return 0
  fi
  ((limit > remaining)) && limit=$remaining
  echo "== $name (timeout ${limit} s)" >&2
  local log="$WORK/$name.log" t0=$SECONDS poller="" base=""
  if [[ "${MEM:-0}" == 1 ]] && command -v nvidia-smi >/dev/null; then
    base=$(mem_used)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$WORK/$name.mem" 2>/dev/null &
    poller=$!
  fi
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  if [[ -n "$poller" ]]; then
    kill "$poller" 2>/dev/null
    wait "$poller" 2>/dev/null
  fi
  local secs=$((SECONDS - t0)) status=ok
  if ((rc == 124 || rc == 137)); then
    status="timeout after ${limit} s"
  elif ((rc != 0)); then
    status="failed (exit $rc)"
  fi
  echo "   $status in ${secs} s" >&2
  grep -v '^{' "$log" | tail -n 25 | sed 's/^/   | /' >&2
  grep '^{' "$log" | sed "s/^{/{\"section\":\"$name\",/" >>"$RESULTS"
  local peak=""
  if [[ -n "$poller" && -s "$WORK/$name.mem" && -n "$base" ]]; then
    peak=$(sort -n "$WORK/$name.mem" | tail -n 1 | tr -d ' ')
    peak=$((peak - base))
  fi
  printf '{"section":"%s","status":"%s","seconds":%d%s}\n' "$name" "$status" "$secs" \
    "${peak:+,\"peak_mib\":$peak}" >>"$RESULTS"
  {
    echo "===== $name: $status in ${secs} s: $*"
    cat "$log"
  } >>"$WORK/logs.txt"
}

# has NAME: the bundle holds executable NAME.
has() { [[ -n "${LISTING:-}" ]] && grep -qx "$1" <<<"$LISTING"; }

# --- the device and the bundle -----------------------------------------------------------
section device 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv; python3 scripts/bench_peers.py device'
section unpack 120 "$BUNDLE" list
LISTING="$(cat "$WORK/unpack.log" 2>/dev/null)"

# --- tests: every packed test executable, one section each --------------------------------
for t in $(grep '^test-' <<<"$LISTING"); do
  section "$t" 150 "$BUNDLE" "$t"
  # Counts for the table: cargo's summary lines and the visible skips.
  [[ -f "$WORK/$t.log" ]] && python3 - "$WORK/$t.log" "$t" >>"$RESULTS" <<'PY'
import json, re, sys
text = open(sys.argv[1], errors="replace").read()
count = lambda key: sum(int(n) for n in re.findall(r"(\d+) " + key, text))
print(json.dumps({"bench": "tests", "impl": sys.argv[2], "passed": count("passed"),
                  "failed": count("failed"), "skipped": text.count("SKIPPED")}))
PY
done

# --- the training step: temper, then PyTorch eager, in separate processes for memory -------
if has bench-train_step; then
  MEM=1 section train-ours 150 "$BUNDLE" bench-train_step --bench --impl ours --steps 8
else
  echo "== train-ours: bench-train_step is not in .gpu (scripts/gpu-build.sh packs it)" >&2
fi
MEM=1 section train-torch-eager 120 python3 scripts/gpt2_peer.py --steps 10

# --- where our step's GPU time goes: ncu's per-kernel durations over exactly one steady-state
# step (the bench opens the profiler's capture range around its first timed step). ----------
# ncu_rows CSV BENCH: ncu's per-kernel summary as results lines {"bench": BENCH, "kernel",
# "kind", "launches", "ms", "share"}.
ncu_rows() {
  python3 - "$1" kernels "$2" >>"$RESULTS" <<'PY'
import csv, glob, json, re, sys
# Our kernels by name prefix, read from kernels/*.cu (the repository travels with the call).
ours = set()
for f in glob.glob(f"{sys.argv[2]}/*.cu*"):
    src = open(f).read()
    for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^()]*(?:\([^()]*\))?[^()]*\)\s*\\?\s*)?(\w+?)(?:##|\()", src):
        ours.add(m.group(1))
rows = list(csv.reader(open(sys.argv[1])))
if not rows:
    sys.exit()
head = [h.strip().lower() for h in rows[0]]
def find(key):
    return next((i for i, h in enumerate(head) if h == key), None)
col = {k: find(k) for k in ["kernel name", "invocations", "metric name", "metric unit", "average"]}
def kind(name):
    base = name.split("(")[0].split("<")[0].strip()
    if any(base.startswith(o) for o in ours):
        return "attention (ours)" if base.startswith("attn_") else "temper kernel"
    if re.search(r"gemm|xmma|cutlass|nvjet|cublas|splitKreduce", name, re.I):
        return "cuBLAS"
    return "other (candle's or the runtime's)"
kernels = {}
for r in rows[1:]:
    try:
        name = r[col["kernel name"]]
        n = int(float(r[col["invocations"]].replace(",", "")))
        if col["metric name"] is not None and r[col["metric name"]] != "gpu__time_duration.sum":
            continue
        avg = float(r[col["average"]].replace(",", ""))
        unit = r[col["metric unit"]] if col["metric unit"] is not None else "nsecond"
    except (TypeError, ValueError, IndexError):
        continue
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
    k = kernels.setdefault(name, [0, 0.0])
    k[0] += n
    k[1] += n * avg * scale
total = sum(v[1] for v in kernels.values()) or 1.0
for name, (n, ms) in kernels.items():
    print(json.dumps({"bench": sys.argv[3], "kernel": name[:120], "kind": kind(name), "launches": n,
                      "ms": ms, "share": ms / total}))
PY
}
NCU="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
if has bench-train_step && [[ -x "$NCU" ]]; then
  section ncu-step 150 env TEMPER_CUDA_PROFILER_STEP=1 "$NCU" --clock-control none \
    --profile-from-start off --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
    /tmp/temper-gpu/bin/bench-train_step --bench --impl ours --steps 1
  [[ -f "$WORK/ncu-step.log" ]] && grep '^"' "$WORK/ncu-step.log" >"$DEST/ncu-train-step.csv"
  [[ -s "$DEST/ncu-train-step.csv" ]] && ncu_rows "$DEST/ncu-train-step.csv" ncu_step
fi

# The same for one decode step of generation (a replay of its CUDA graph: ncu profiles each
# kernel node), GPT-2 small at 64 rows.
if has bench-generate && [[ -x "$NCU" ]]; then
  section ncu-decode 120 env TEMPER_CUDA_PROFILER_DECODE_STEP=4 "$NCU" --clock-control none \
    --profile-from-start off --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
    /tmp/temper-gpu/bin/bench-generate --bench --new 8 --reps 1
  [[ -f "$WORK/ncu-decode.log" ]] && grep '^"' "$WORK/ncu-decode.log" >"$DEST/ncu-decode-step.csv"
  [[ -s "$DEST/ncu-decode-step.csv" ]] && ncu_rows "$DEST/ncu-decode-step.csv" ncu_decode
fi

# Ablation: the blocks in candle's autograd graph instead of our tape ([train] tape = "off").
if has bench-train_step; then
  MEM=1 section train-graph 120 "$BUNDLE" bench-train_step --bench --impl ours-graph --steps 4
fi

# --- HOOK: generation (benches/generate.rs and its transformers peer) ------------------------
# Runs when gpu-build.sh has packed bench-generate; skipped visibly otherwise. Contract for the
# table: both sides print JSON lines {"bench":"generate","shape":S,"impl":I,"tokens_per_s":X},
# temper's with impl "temper" (or starting with "ours"), the peer's with impl starting with
# "transformers" or "torch". The peer is scripts/bench_generate.py when it exists
# (TEMPER_GENERATE_PEER overrides the command).
if has bench-generate; then
  section bench-generate 120 "$BUNDLE" bench-generate --bench
  # Ablations: the decode step op by op, at fixed shapes (what the graph replays) and at the
  # cache's shapes (the step before the graph).
  section bench-generate-fixed 90 "$BUNDLE" bench-generate --bench --decode fixed --reps 1
  section bench-generate-dynamic 90 "$BUNDLE" bench-generate --bench --decode dynamic --reps 1
  peer_cmd="${TEMPER_GENERATE_PEER:-}"
  [[ -z "$peer_cmd" && -f scripts/bench_generate.py ]] && peer_cmd="python3 scripts/bench_generate.py"
  if [[ -n "$peer_cmd" ]]; then
    # shellcheck disable=SC2086
    section peer-generate 120 $peer_cmd
  else
    echo "== peer-generate: no scripts/bench_generate.py; skipped" >&2
    printf '{"section":"peer-generate","status":"skipped (no peer script)"}\n' >>"$RESULTS"
  fi
else
  echo "== bench-generate: not in .gpu yet; skipped" >&2
  printf '{"section":"bench-generate","status":"skipped (not in .gpu)"}\n' >>"$RESULTS"
fi

# --- one PPO update at GPT-2 small: where an RL step's time goes --------------------------------
# A GPT-2-shaped policy (random weights from one pretraining step), 64 prompts of 256 tokens,
# 128 new tokens at T=0.7, a programmatic reward; the PPO log splits each rollout into
# generation, scoring and training (gen_s, score_s, train_s). Goal: generation under half.
if has temper; then
  python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
words = "the quick brown fox jumps over a lazy dog while seven wise owls count stars".split()
with open(f"{work}/ppo-prompts.jsonl", "w") as f:
    for i in range(80):
        text = " ".join(words[(i + k) % len(words)] for k in range(64))[:256]
        f.write(json.dumps({"prompt": text}) + "\n")
with open(f"{work}/ppo.toml", "w") as f:
    f.write("[train]\nlog_every = 1\n[ppo]\nrollout_batch = 64\nminibatch_size = 64\n"
            "ppo_epochs = 1\nmax_new_tokens = 128\ntemperature = 0.7\neval_prompts = 4\n"
            "log_completions = 0\n")
PY
  section ppo-init 120 "$BUNDLE" temper pretrain --model gpt2 --steps 1 --batch-size 1 \
    --seq-len 64 --device cuda --out "$WORK/gpt2-init"
  MEM=1 section ppo-update 150 "$BUNDLE" temper ppo --init "$WORK/gpt2-init" \
    --data "$WORK/ppo-prompts.jsonl" --config "$WORK/ppo.toml" --device cuda --steps 2 \
    --eval-every 1000 --reward "cmd:python3 $ROOT/tests/fixtures/varied_reward.py" --out "$WORK/ppo"
  if [[ -s "$WORK/ppo/metrics.jsonl" ]]; then
    python3 - "$WORK/ppo/metrics.jsonl" >>"$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"gen_s"' in l]
for r in rows:
    split = {k: r.get(k) for k in ["gen_s", "score_s", "train_s", "gen_tokens_per_s", "gen_graph_replays"]}
    total = sum(v for k, v in split.items() if k in ("gen_s", "score_s", "train_s") and isinstance(v, (int, float)))
    print(json.dumps({"section": "ppo-update", "bench": "ppo_update", "step": r.get("step"),
                      "gen_share": (split["gen_s"] or 0) / total if total else None, **split}))
PY
  fi
fi

# --- torch.compile on the same step (its compilation takes a minute or more, untimed) -------
MEM=1 section train-torch-compile 240 python3 scripts/gpt2_peer.py --compile --steps 10

# --- kernel benches and their peers ----------------------------------------------------------
section peer-copy 60 python3 scripts/bench_peers.py copy
# NAME:BENCH_TIMEOUT_S:PEER_TIMEOUT_S. train_ops' bench and peer each take well under their
# 90 s (modest repetitions); the tight limit keeps a hang from eating the later sections.
for spec in attention:150:120 lora:150:120 train_ops:90:90 rmsnorm:150:120 gae:150:120 \
  allreduce:150:120; do
  IFS=: read -r b bench_s peer_s <<<"$spec"
  if has "bench-$b"; then
    section "bench-$b" "$bench_s" "$BUNDLE" "bench-$b" --bench
  else
    echo "== bench-$b: not in .gpu (scripts/gpu-build.sh packs it)" >&2
    printf '{"section":"bench-%s","status":"missing from .gpu"}\n' "$b" >>"$RESULTS"
  fi
  section "peer-$b" "$peer_s" python3 scripts/bench_peers.py "$b"
done

# --- the rest, as time allows: the step with the 128-row attention forward, with temper's
# reference kernels, and the compute-copies ablation -----------------------------------------
if has bench-train_step; then
  # The 128-row attention forward (attn_fwd_mma2), which `Auto` does not take yet: the step
  # with it, to decide whether it becomes the default.
  MEM=1 section train-attn-wide 90 env TEMPER_ATTN_IMPL=mma-wide "$BUNDLE" bench-train_step \
    --bench --impl ours --steps 4
  MEM=1 section train-reference 120 "$BUNDLE" bench-train_step --bench --impl reference --steps 4
  # Ablation: each f32 master cast in every step instead of AdamW's bf16 compute copies.
  MEM=1 section train-casts 90 "$BUNDLE" bench-train_step --bench --impl ours-casts --steps 4
fi
# The README's main job on the GPU, with whatever time is left.
if has temper; then
  section pipeline 240 "$BUNDLE" temper pipeline --device cuda --out "$WORK/pipeline"
fi
# Last: why attention trails flash. ncu's throughput, pipe, memory and stall sections for the
# first launches of our tensor-core forward (64- and 128-row) and backward in the attention
# bench, into ncu-attention.txt for whoever tunes them next.
if has bench-attention && [[ -x "$NCU" ]]; then
  section ncu-attention 120 "$NCU" --clock-control none \
    -k 'regex:attn_(fwd_mma|fwd_mma2|bwd_mma)_bf16' --launch-count 8 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats \
    /tmp/temper-gpu/bin/bench-attention --bench
  [[ -f "$WORK/ncu-attention.log" ]] && cp "$WORK/ncu-attention.log" "$DEST/ncu-attention.txt"
fi

# --- the table --------------------------------------------------------------------------------
cp "$RESULTS" "$DEST/results.jsonl"
cp "$WORK/logs.txt" "$DEST/logs.txt" 2>/dev/null || : >"$DEST/logs.txt"
python3 - "$RESULTS" "$((SECONDS - START))" >"$DEST/gpu-check.md" <<'PY'
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
status = {r["section"]: r for r in rows if "status" in r}
meas = [r for r in rows if "bench" in r]


def pick(**kw):
    for r in meas:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return {}


def num(x, spec=None):
    if not isinstance(x, (int, float)):
        return "-"
    if spec:
        return format(x, spec)
    return format(x, ",.0f") if abs(x) >= 1000 else format(x, ".4g")


def sec_state(*names):
    bad = [f"{n}: {status[n]['status']}" for n in names if n in status and status[n]["status"] != "ok"]
    return "; ".join(bad)


out = []
out.append(f"# gpu-check ({sys.argv[2]} s)")
dev = pick(bench="device")
if dev:
    out.append(f"\ndevice: {dev.get('name')}, torch {dev.get('torch')}, CUDA {dev.get('cuda')}")
copy = pick(bench="copy").get("gbps")
out.append("\nratio = temper / peer, both measured in this run. For times (ms) below 1 is "
           "better for temper; for rates (TFLOP/s, tokens/s, GB/s) above 1 is; for memory below 1.\n")
out.append("| what | shape | metric | temper | peer | peer value | ratio | note |")
out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")


def row(what, shape, metric, ours, peer, theirs, note=""):
    ratio = ours / theirs if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs else None
    out.append(f"| {what} | {shape} | {metric} | {num(ours)} | {peer} | {num(theirs)} | {num(ratio, '.2f')} | {note} |")


# The training step (ours from its own section: the ncu run prints the same line, slowed).
ours = pick(bench="train_step", impl="ours", section="train-ours")
note = sec_state("train-ours", "train-torch-eager", "train-torch-compile")
for peer in ["torch-eager", "torch-compile"]:
    p = pick(bench="train_step", impl=peer)
    row("GPT-2 124M train step", "B16 T1024 bf16", "tokens/s", ours.get("tokens_per_s"), peer, p.get("tokens_per_s"), note)
    sec = "train-torch-eager" if peer == "torch-eager" else "train-torch-compile"
    row("GPT-2 124M train step", "B16 T1024 bf16", "peak GPU MiB (nvidia-smi)",
        status.get("train-ours", {}).get("peak_mib"), peer, status.get(sec, {}).get("peak_mib"),
        f"torch's own peak: {num(p.get('peak_reserved_gib'))} GiB reserved, {num(p.get('peak_alloc_gib'))} allocated")
    row("GPT-2 124M train step", "B16 T1024 bf16", "peak GiB allocated (allocator's own)",
        ours.get("pool_peak_gib"), peer, p.get("peak_alloc_gib"),
        "ours: the CUDA memory pool's high-water mark; torch: max_memory_allocated")
refr = pick(bench="train_step", impl="reference")
if refr:
    row("GPT-2 124M train step", "B16 T1024 bf16", "tokens/s", refr.get("tokens_per_s"), "temper reference kernels",
        ours.get("tokens_per_s"), "reference over ours, not a peer")
# Ablations of ours (not peers): each over ours, tokens/s and peak memory.
for imp, sec, base, what in [
    ("ours-graph", "train-graph", "temper with the tape", "blocks in candle's graph"),
    ("ours-casts", "train-casts", "temper with compute copies", "masters cast every step"),
    ("ours", "train-attn-wide", "temper (64-row attention forward)", "128-row attention forward"),
]:
    abl = pick(bench="train_step", impl=imp, section=sec)
    if abl:
        row("GPT-2 124M train step", "B16 T1024 bf16", "tokens/s", abl.get("tokens_per_s"), base,
            ours.get("tokens_per_s"), f"ablation: {what}, over ours; not a peer")
        row("GPT-2 124M train step", "B16 T1024 bf16", "peak GPU MiB (nvidia-smi)",
            status.get(sec, {}).get("peak_mib"), base,
            status.get("train-ours", {}).get("peak_mib"), "ablation, as above")

# Where one steady-state step of ours goes (ncu): the share of kernel time by kind, then the
# largest kernels. The goal: GEMMs and attention the majority, no candle generic kernel high.
def ncu_table(bench, title):
    ncu = [r for r in meas if r.get("bench") == bench]
    if not ncu:
        return
    total = sum(r["ms"] for r in ncu)
    kinds = {}
    for r in ncu:
        k = kinds.setdefault(r["kind"], [0, 0.0])
        k[0] += r["launches"]
        k[1] += r["ms"]
    out.append(f"\nncu, {title}: {total:.3f} ms of kernel time, "
               f"{sum(r['launches'] for r in ncu)} launches\n")
    out.append("| kind | launches | ms | share |")
    out.append("| --- | --- | --- | --- |")
    for kind, (n, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        out.append(f"| {kind} | {n} | {ms:.3f} | {ms / total:.1%} |")
    out.append("\n| kernel (largest 20) | kind | launches | ms | share |")
    out.append("| --- | --- | --- | --- | --- |")
    for r in sorted(ncu, key=lambda r: -r["ms"])[:20]:
        out.append(f"| `{r['kernel'][:70]}` | {r['kind']} | {r['launches']} | {r['ms']:.3f} | {r['share']:.1%} |")
    out.append("")


ncu_table("ncu_step", "one steady-state step of ours (B16 T1024 bf16)")
ncu_table("ncu_decode", "one decode step of generation (GPT-2 small, 64 rows, graph replay)")

# Attention.
for shape in sorted({r["shape"] for r in meas if r.get("bench") == "attention"}):
    note = sec_state("bench-attention", "peer-attention")
    for p in ["fwd", "fwd+bwd"]:
        # ours-mma-wide: the 128-row forward (TEMPER_ATTN_IMPL=mma-wide), not yet the default.
        for impl, what in [("ours-mma", "attention causal"), ("ours-mma-wide", "attention, 128-row fwd")]:
            o = pick(bench="attention", shape=shape, impl=impl, **{"pass": p}).get("tflops")
            for peer in ["torch-flash", "torch-cudnn"]:
                row(what, shape, f"{p} TFLOP/s", o, peer,
                    pick(bench="attention", shape=shape, impl=peer, **{"pass": p}).get("tflops"), note)

# Attention decode: time against SDPA, and bytes of keys and values per second against copy.
for shape in sorted({r["shape"] for r in meas if r.get("bench") == "attention_decode"}):
    note = sec_state("bench-attention", "peer-attention")
    for o in ["ours", "ours-simple"]:
        row("attention decode", shape, f"{o} ms", pick(bench="attention_decode", shape=shape, impl=o).get("ms"),
            "torch-sdpa", pick(bench="attention_decode", shape=shape, impl="torch-sdpa").get("ms"), note)
    row("attention decode", shape, "ours GB/s", pick(bench="attention_decode", shape=shape, impl="ours").get("gbps"),
        "copy bandwidth", 4100, "goal >= 0.5")

# LoRA: the fused op over PyTorch's plain GEMM and over PyTorch's unfused LoRA.
for shape in sorted({r["shape"] for r in meas if r.get("bench") == "lora"}):
    note = sec_state("bench-lora", "peer-lora")
    for key, label in [("fwd_ms", "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms")]:
        o = pick(bench="lora", shape=shape, impl="fused").get(key)
        for peer in ["torch-plain", "torch-unfused"]:
            row("LoRA fused", shape, label, o, peer, pick(bench="lora", shape=shape, impl=peer).get(key), note)
        row("candle plain GEMM", shape, label, pick(bench="lora", shape=shape, impl="candle-plain").get(key),
            "torch-plain", pick(bench="lora", shape=shape, impl="torch-plain").get(key), "what candle's own GEMM costs")
        row("our cuBLASLt GEMM (gemm)", shape, label, pick(bench="lora", shape=shape, impl="ours-gemm").get(key),
            "torch-plain", pick(bench="lora", shape=shape, impl="torch-plain").get(key), "every linear layer's GEMM")

# RMSNorm.
for shape in sorted({r["shape"] for r in meas if r.get("bench") == "rmsnorm"}):
    note = sec_state("bench-rmsnorm", "peer-rmsnorm")
    for key, label in [("fwd_ms", "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms")]:
        row("RMSNorm", shape, label, pick(bench="rmsnorm", shape=shape, impl="ours").get(key), "torch",
            pick(bench="rmsnorm", shape=shape, impl="torch").get(key), note)

# The training step's ops (benches/train_ops.rs): ours over PyTorch eager. AdamW's figure is
# one optimizer step (clipping included) and it has no fwd+bwd. An op added to the bench and
# its peer gets its rows here by its name.
op_names = {"layernorm": "LayerNorm", "gelu": "GELU (tanh)", "bias": "bias add", "bias_gelu": "bias + GELU",
            "swiglu": "SwiGLU", "rope": "RoPE (queries)", "heads": "attention head split",
            "embedding": "embedding (token + position)", "logprobs": "loss head log-probs",
            "adamw": "AdamW step (clipped)"}
train_ops = [r for r in meas if r.get("bench") == "train_ops"]
for op, shape in dict.fromkeys((r.get("op"), r.get("shape")) for r in train_ops):
    note = sec_state("bench-train_ops", "peer-train_ops")
    o = pick(bench="train_ops", op=op, shape=shape, impl="ours")
    t = pick(bench="train_ops", op=op, shape=shape, impl="torch")
    for key, label in [("fwd_ms", "step ms" if op == "adamw" else "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms")]:
        if o.get(key) is None and t.get(key) is None:
            continue
        row(op_names.get(op, op), shape, label, o.get(key), "torch", t.get(key), note)

# GAE.
for shape in sorted({r["shape"] for r in meas if r.get("bench") == "gae"}):
    note = sec_state("bench-gae", "peer-gae")
    k = pick(bench="gae", shape=shape, impl="ours-kernel")
    row("GAE", shape, "ms", k.get("ms"), "torch-trl-loop", pick(bench="gae", shape=shape, impl="torch-trl-loop").get("ms"), note)
    row("GAE", shape, "GB/s", k.get("gbps"), "torch copy", copy, "kernel over the copy ceiling")

# The data-parallel gradient all-reduce (NCCL, world size 1 on this one GPU).
for shape in sorted({r["shape"] for r in meas if r.get("bench") == "allreduce"}):
    note = sec_state("bench-allreduce", "peer-allreduce")
    for o, p in [("ours-bucketed", "torch-buckets"), ("ours-one-buffer", "torch-one-buffer")]:
        row("all-reduce (NCCL)", shape, f"{o} ms", pick(bench="allreduce", shape=shape, impl=o).get("ms"), p,
            pick(bench="allreduce", shape=shape, impl=p).get("ms"), note)

# Generation (the hook).
for shape in sorted({r.get("shape", "") for r in meas if r.get("bench") == "generate"}):
    gen = [r for r in meas if r.get("bench") == "generate" and r.get("shape", "") == shape]
    o = next((r for r in gen if r.get("impl") == "temper"), {})
    ablations = [r for r in gen if str(r.get("impl", "")).startswith("ours")]
    for p in [r for r in gen if str(r.get("impl", "")).startswith(("transformers", "torch"))]:
        row("generate", shape, "tokens/s", o.get("tokens_per_s"), p["impl"], p.get("tokens_per_s"),
            sec_state("bench-generate", "peer-generate"))
        for a in ablations:
            row("generate", shape, f"{a['impl']} tokens/s", a.get("tokens_per_s"), p["impl"],
                p.get("tokens_per_s"), "ablation: the decode step without its CUDA graph")
    if o.get("ms_floor_step"):
        row("generate decode step", shape, "ms", o.get("ms_decode_step"), "bandwidth floor (4.1 TB/s)",
            o.get("ms_floor_step"), "weights + KV cache bytes per step over copy bandwidth; goal <= 2")

# One PPO update (temper alone: the goal is a share, generation under half of the update).
for r in [m for m in meas if m.get("bench") == "ppo_update"]:
    out.append(f"\nPPO update at GPT-2 small, step {r.get('step')}: generation {num(r.get('gen_s'))} s "
               f"({num(r.get('gen_tokens_per_s'))} tokens/s), scoring {num(r.get('score_s'))} s, training "
               f"{num(r.get('train_s'))} s; generation share {num(r.get('gen_share'), '.2f')} (goal < 0.5); "
               f"{num(r.get('gen_graph_replays'))} decode steps replayed as a CUDA graph; "
               f"peak GPU {status.get('ppo-update', {}).get('peak_mib', '-')} MiB")

# The benches' own checks: each direct backward entry point against candle's autograd.
checks = [r for r in meas if r.get("bench") == "check"]
if checks:
    out.append("\n| check | shape | impl | max relative difference |")
    out.append("| --- | --- | --- | --- |")
    for r in checks:
        out.append(f"| {r.get('of')}: {r.get('what')} | {r.get('shape')} | {r.get('impl')} | {num(r.get('max_rel_diff'), '.2e')} |")

# Tests.
out.append("\n| test executable | passed | failed | skipped | status |")
out.append("| --- | --- | --- | --- | --- |")
for r in meas:
    if r.get("bench") == "tests":
        st = status.get(r["impl"], {}).get("status", "?")
        out.append(f"| {r['impl']} | {r['passed']} | {r['failed']} | {r['skipped']} | {st} |")

out.append("\n| section | status | seconds |")
out.append("| --- | --- | --- |")
for name, r in status.items():
    out.append(f"| {name} | {r['status']} | {r.get('seconds', '-')} |")
print("\n".join(out))
PY
echo >&2
echo "raw numbers and logs: $DEST (gpu-check.md, results.jsonl, logs.txt)" >&2
cat "$DEST/gpu-check.md"
rm -rf "$WORK"
# Non-zero when any section did not pass, so a caller can tell; the table says which.
! grep -q '"status":"\(failed\|timeout\)' "$DEST/results.jsonl"
