"""The table at the end of scripts/gpu-check.sh: every measurement of one run as ratios,
temper over the peer measured in that same run, in markdown.

Usage: python3 scripts/gpu_check_table.py RESULTS_JSONL SECONDS > gpu-check.md
RESULTS_JSONL holds the benches' JSON lines (each tagged with its "section") and one status
line per section; tests/gpu_check_scripts.rs runs this on synthetic lines in CPU CI.
"""
import json, re, sys


def parse(line):
    """One results line, or None. Rust's `{:e}` formatting prints a non-finite float as a bare
    `inf` or `NaN`, which JSON has no word for: read those as Python's float does."""
    try:
        return json.loads(line)
    except ValueError:
        fixed = re.sub(r"(?<=[:\[,])\s*(-?)(inf|NaN|nan)\b(?=\s*[,}\]])",
                       lambda m: m.group(1) + ("Infinity" if m.group(2) == "inf" else "NaN"), line)
        try:
            return json.loads(fixed)
        except ValueError:
            return None


rows, unreadable = [], []
for line in open(sys.argv[1], errors="replace"):
    if line.strip().startswith("{"):
        r = parse(line)
        if isinstance(r, dict):
            rows.append(r)
        else:
            unreadable.append(line.strip())
status = {r["section"]: r for r in rows if "status" in r and "section" in r}


def measured(r):
    """A bench's measurement, unless the bench printed it while ncu profiled it (the train step
    and generation print their usual lines under ncu, slowed many times over); ncu's own
    per-kernel rows are kept."""
    under_ncu = str(r.get("section", "")).startswith("ncu-")
    return "bench" in r and (not under_ncu or str(r["bench"]).startswith("ncu_"))


meas = [r for r in rows if measured(r)]


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


# Ratios to two decimals, or two significant digits below 0.1 (GAE against TRL's Python loop
# is hundreds of times faster: "0.00" would hide by how much).
def row(what, shape, metric, ours, peer, theirs, note=""):
    ratio = ours / theirs if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs else None
    out.append(f"| {what} | {shape} | {metric} | {num(ours)} | {peer} | {num(theirs)} | {num(ratio, '.2f' if ratio is None or ratio >= 0.1 else '.2g')} | {note} |")


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
    ("ours-recompute", "train-recompute", "temper keeping every block's activations",
     "blocks recomputed in the backward (gradient_checkpointing)"),
    ("ours", "train-attn-wide", "temper (64-row/64-key attention tiles)", "128-row/128-key attention tiles"),
    ("ours", "train-gemm-timed", "temper (cuBLASLt's first answers)", "cuBLASLt's candidates timed"),
]:
    abl = pick(bench="train_step", impl=imp, section=sec)
    if abl:
        row("GPT-2 124M train step", "B16 T1024 bf16", "tokens/s", abl.get("tokens_per_s"), base,
            ours.get("tokens_per_s"), f"ablation: {what}, over ours; not a peer")
        row("GPT-2 124M train step", "B16 T1024 bf16", "peak GPU MiB (nvidia-smi)",
            status.get(sec, {}).get("peak_mib"), base,
            status.get("train-ours", {}).get("peak_mib"), "ablation, as above")
        row("GPT-2 124M train step", "B16 T1024 bf16", "peak GiB allocated (pool)",
            abl.get("pool_peak_gib"), base, ours.get("pool_peak_gib"), "ablation, as above")

# Where one steady-state step of ours goes (ncu): the share of kernel time by kind, then the
# largest kernels. The goal: GEMMs and attention the majority, no candle generic kernel high.
def ncu_table(bench, title):
    ncu = [r for r in meas if r.get("bench") == bench]
    if not ncu:
        return
    total = sum(r["ms"] for r in ncu)
    denom = total or 1.0  # every kernel under ncu's resolution: shares of 0, not a crash
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
        out.append(f"| {kind} | {n} | {ms:.3f} | {ms / denom:.1%} |")
    out.append("\n| kernel (largest 20) | kind | launches | ms | share |")
    out.append("| --- | --- | --- | --- | --- |")
    for r in sorted(ncu, key=lambda r: -r["ms"])[:20]:
        out.append(f"| `{r['kernel'][:70]}` | {r['kind']} | {r['launches']} | {r['ms']:.3f} | {r['share']:.1%} |")
    out.append("")


ncu_table("ncu_step", "one steady-state step of ours (B16 T1024 bf16)")
ncu_table("ncu_decode", "one decode step of generation (GPT-2 small, 64 rows, graph replay)")
ncu_table("ncu_lora", "one fused LoRA fwd+bwd (r16 M8192 K4096 N4096)")

# Attention.
def attn_bwd_tflops(shape, impl):
    """The backward alone, from the same run's two timings: (fwd+bwd) - fwd, 2.5x the forward's
    FLOPs; derived alike for ours and the peers, which time no backward on its own."""
    fwd = pick(bench="attention", shape=shape, impl=impl, **{"pass": "fwd"})
    both = pick(bench="attention", shape=shape, impl=impl, **{"pass": "fwd+bwd"})
    try:
        fwd_flops = fwd["tflops"] * fwd["ms"]  # TFLOP/s x ms = GFLOP
        return 2.5 * fwd_flops / (both["ms"] - fwd["ms"])
    except (KeyError, TypeError, ZeroDivisionError):
        return None


for shape in sorted({r["shape"] for r in meas if r.get("bench") == "attention"}):
    note = sec_state("bench-attention", "peer-attention")
    for p in ["fwd", "fwd+bwd", "bwd"]:
        # ours-mma-wide: FlashAttention-2's tiles, the 128-row forward and the 128-key backward
        # (TEMPER_ATTN_IMPL=mma-wide), not yet the default.
        for impl, what in [("ours-mma", "attention causal"), ("ours-mma-wide", "attention, wide tiles"),
                           ("ours-mma-narrow", "attention, narrow backward (sm_86/89's)")]:
            if impl == "ours-mma-wide" and shape.endswith("D256"):
                continue  # one tiling at head dim 256
            if impl == "ours-mma-narrow" and not shape.endswith("D256"):
                continue  # head dim 256 only
            for peer in ["torch-flash", "torch-cudnn"]:
                if p == "bwd":
                    o, theirs = attn_bwd_tflops(shape, impl), attn_bwd_tflops(shape, peer)
                else:
                    o = pick(bench="attention", shape=shape, impl=impl, **{"pass": p}).get("tflops")
                    theirs = pick(bench="attention", shape=shape, impl=peer, **{"pass": p}).get("tflops")
                label = "bwd TFLOP/s ((fwd+bwd) - fwd)" if p == "bwd" else f"{p} TFLOP/s"
                row(what, shape, label, o, peer, theirs, note)

def attention_ms_rows(bench, what, sections, peers):
    """Our fwd and fwd+bwd ms in `bench` (impl "ours") over each peer's, per shape."""
    note = sec_state(*sections)
    for shape in sorted({r["shape"] for r in meas if r.get("bench") == bench}):
        for p in ["fwd", "fwd+bwd"]:
            ours_ms = pick(bench=bench, shape=shape, impl="ours", **{"pass": p}).get("ms")
            for peer in peers:
                theirs = pick(bench=bench, shape=shape, impl=peer, **{"pass": p}).get("ms")
                row(what, shape, f"{p} ms", ours_ms, peer, theirs, note)


# Packed rows: our document-masked attention against FlexAttention's, and against SDPA flash
# causal over the whole rows (what ignoring the documents would cost).
attention_ms_rows("attention_packed", "attention, document mask",
                  ("bench-attention-packed", "peer-attention-packed"), ["torch-flex", "torch-flash-causal"])
# Gemma 2's capped scores: ours against transformers' eager Gemma 2 attention and FlexAttention
# with the cap as its score modifier.
attention_ms_rows("attention_softcap", "attention, soft cap (Gemma 2)",
                  ("bench-attention-softcap", "peer-attention-softcap"), ["torch-eager", "torch-flex"])

# Attention decode: time against SDPA, and bytes of keys and values per second against copy.
for shape in sorted({r["shape"] for r in meas if r.get("bench") == "attention_decode"}):
    note = sec_state("bench-attention", "peer-attention")
    for o in ["ours", "ours-simple"]:
        if o == "ours-simple" and shape.endswith("D256"):
            continue  # no simple kernel at head dim 256
        row("attention decode", shape, f"{o} ms", pick(bench="attention_decode", shape=shape, impl=o).get("ms"),
            "torch-sdpa", pick(bench="attention_decode", shape=shape, impl="torch-sdpa").get("ms"), note)
    row("attention decode", shape, "ours GB/s", pick(bench="attention_decode", shape=shape, impl="ours").get("gbps"),
        "copy bandwidth", 4100, "goal >= 0.5")

# LoRA: the fused op over PyTorch's plain GEMM and over PyTorch's unfused LoRA; then our GEMM
# and the fused op with cuBLASLt's candidates timed (impl "<name>-timed", TEMPER_GEMM_TUNE=timed
# inside the bench), an ablation of the default first answer.
for shape in sorted({r["shape"] for r in meas if r.get("bench") == "lora"}):
    note = sec_state("bench-lora", "peer-lora")
    for key, label in [("fwd_ms", "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms")]:
        plain = pick(bench="lora", shape=shape, impl="torch-plain").get(key)
        o = pick(bench="lora", shape=shape, impl="fused", section="bench-lora").get(key)
        for peer in ["torch-plain", "torch-unfused"]:
            row("LoRA fused", shape, label, o, peer, pick(bench="lora", shape=shape, impl=peer).get(key), note)
        row("candle plain GEMM", shape, label,
            pick(bench="lora", shape=shape, impl="candle-plain", section="bench-lora").get(key),
            "torch-plain", plain, "what candle's own GEMM costs")
        row("our cuBLASLt GEMM (gemm)", shape, label,
            pick(bench="lora", shape=shape, impl="ours-gemm", section="bench-lora").get(key),
            "torch-plain", plain, "every linear layer's GEMM")
        for imp, what in [("fused", "LoRA fused"), ("ours-gemm", "our cuBLASLt GEMM")]:
            t = pick(bench="lora", shape=shape, impl=f"{imp}-timed", section="bench-lora").get(key)
            if t is not None:
                row(f"{what}, candidates timed", shape, label, t, "torch-plain", plain,
                    "ablation: TEMPER_GEMM_TUNE=timed")

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
            "swiglu": "SwiGLU", "geglu": "GeGLU (Gemma)", "rope": "RoPE (queries)", "heads": "attention head split",
            "embedding": "embedding (token + position)", "logprobs": "loss head log-probs",
            "logprobs_entropy": "loss head log-probs + entropy",
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
            sec_state(o.get("section", "bench-generate"), p.get("section", "peer-generate")))
        for a in ablations:
            switched = [d for tag, d in [
                ("fixed-shapes", "the fixed-shape decode step op by op, without its CUDA graph"),
                ("dynamic-shapes", "the decode step at the cache's shapes, without its CUDA graph"),
                ("decode-gemm", "our few-row GEMM for the decode step's (TEMPER_DECODE_GEMM=ours)"),
                ("gemm-timed", "cuBLASLt's candidates timed (TEMPER_GEMM_TUNE=timed)"),
                ("pdl", "programmatic dependent launches (TEMPER_PDL=on)")] if tag in a["impl"]]
            what = " + ".join(switched) or a["impl"]
            row("generate", shape, f"{a['impl']} tokens/s", a.get("tokens_per_s"), p["impl"],
                p.get("tokens_per_s"), f"ablation: {what}")
    # Against the floor every variant has its own row, peer or no peer in this run.
    for r in [o] + ablations:
        if r.get("ms_floor_step"):
            what = "ms" if r is o else f"{r['impl'].removeprefix('ours-')} ms"
            note = "weights + KV cache bytes per step over copy bandwidth; goal <= 2"
            g = r.get("graph") or {}
            if g:
                # A programmatic launch overlaps the kernel ahead only across a programmatic
                # edge; memory nodes between two kernels leave a plain one.
                note += (f"; graph: {g.get('kernels')} kernels, {g.get('mem_allocs')} allocs, "
                         f"{g.get('mem_frees')} frees, {g.get('kernel_to_kernel')} kernel-to-kernel "
                         f"edges, {g.get('programmatic')} programmatic")
            row("generate decode step", shape, what, r.get("ms_decode_step"), "bandwidth floor (4.1 TB/s)",
                r.get("ms_floor_step"), note)

# One PPO update (temper alone: the goal is a share, generation under half of the update).
for r in [m for m in meas if m.get("bench") == "ppo_update"]:
    out.append(f"\nPPO update at GPT-2 small, step {r.get('step')}: generation {num(r.get('gen_s'))} s "
               f"({num(r.get('gen_tokens_per_s'))} tokens/s), scoring {num(r.get('score_s'))} s, training "
               f"{num(r.get('train_s'))} s; generation share {num(r.get('gen_share'), '.2f')} (goal < 0.5); "
               f"{num(r.get('gen_graph_replays'))} decode steps replayed as a CUDA graph; "
               f"peak GPU {status.get('ppo-update', {}).get('peak_mib', '-')} MiB")

# Loss spikes of a training run (scripts/loss_spikes.py): the goal is none.
for r in [m for m in meas if m.get("bench") == "loss_spikes"]:
    spikes = r.get("spikes")
    verdict = ("no spike" if spikes == 0 else
               f"{num(spikes)} spiking step(s), the first at step {r.get('first_spike_step')}")
    at = f" (step {r['max_rise_step']})" if r.get("max_rise_step") is not None else ""
    out.append(f"\nTraining loss of {r.get('run')} ({status.get(r.get('section'), {}).get('status', '-')}): "
               f"to step {r.get('last_step')}, first {num(r.get('first'), '.3f')}, lowest {num(r.get('min'), '.3f')}, "
               f"last {num(r.get('last'), '.3f')}; largest rise over the baseline {num(r.get('max_rise'), '.3f')}{at}; "
               f"{verdict} (a spike: a loss over {r.get('rise')} above the lowest {r.get('window')}-step mean "
               f"so far, after step {r.get('skip')}, or a non-finite loss; {num(r.get('nonfinite'))} non-finite)")

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

if unreadable:
    out.append(f"\n{len(unreadable)} results line(s) were not JSON and are left out of the tables:")
    out.extend(f"    {l[:200]}" for l in unreadable[:10])

out.append("\n| section | status | seconds |")
out.append("| --- | --- | --- |")
for name, r in status.items():
    out.append(f"| {name} | {r['status']} | {r.get('seconds', '-')} |")
print("\n".join(out))
