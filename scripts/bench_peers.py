#!/usr/bin/env python3
"""PyTorch peers for temper's kernel benches, at the same shapes, on the same GPU.

Prints one JSON object per line (the format benches/attention.rs and benches/lora.rs print),
so scripts/gpu-check.sh can put ours and theirs in one table:

- attention: SDPA, causal bf16, B=8 H=16 S=2048 D=128, B=16 H=32 S=1024 D=64 and
  B=8 H=8 S=2048 D=256 (Gemma's head dim), with the
  flash (FA2) and cuDNN backends, plus the materialised version (matmul, mask, softmax,
  matmul) at the first shape: fwd and fwd+bwd TFLOP/s (FLOPs as benches/attention.rs: 4·B·H·S²·D,
  halved when causal; fwd+bwd = 3.5x).
- attention_packed: packed rows (B=8 H=16 S=2048 D=128 bf16, each row the documents of
  PACKED_DOCS, which benches/attention.rs shares) with a causal document mask, through
  FlexAttention compiled with that mask as its block mask (PyTorch's own way to train on
  packed documents), and, for scale, SDPA flash causal over the whole rows (what ignoring the
  documents costs): fwd and fwd+bwd ms and TFLOP/s over the visible pairs, 4·B·H·D·Σ n(n+1)/2.
- attention_softcap: Gemma 2's capped scores (50 tanh(s / 50)), causal bf16, at Gemma 2 2B's
  heads (8 query heads on 4 kv heads, D=256), B=4 S=2048: transformers' eager Gemma 2
  attention (repeat the kv heads, scores materialised and capped, causal mask, f32 softmax:
  what transformers runs Gemma 2 with by default) and FlexAttention compiled with the cap as
  its score modifier and a causal block mask; fwd and fwd+bwd ms and TFLOP/s (causal FLOPs).
- lora: the plain GEMM x W^T and unfused LoRA (x W^T + s (x A^T) B^T, W frozen), fwd and
  fwd+bwd milliseconds, r=16 M=8192 K=N=4096 and r=8 M=4096 K=N=768: the two yardsticks
  scripts/gpu-check.sh divides temper's fused LoRA by.
- rmsnorm: F.rms_norm, bf16, 16384x768 and 8192x4096, fwd and fwd+bwd (dx and dw).
- gae: the TRL-style loop `for t in reversed(range(T))` on the GPU at B=512,T=1024 and
  B=4096,T=4096.
- copy: device-to-device copy bandwidth (bytes read + written), the memory ceiling.
- train_ops: the training step's kernel ops at benches/train_ops.rs's GPT-2 124M B16 T1024
  bf16 shapes, fwd and fwd+bwd ms: F.layer_norm, F.gelu(approximate="tanh"), the bias add and
  bias + GELU, SwiGLU, RoPE, the head split (view, transpose, contiguous), token + position
  F.embedding (backward to both tables), the loss head
  (F.cross_entropy per token over the bf16 logits upcast to f32, backward to the logits), and
  one torch.optim.AdamW(fused=True) step with clip_grad_norm_ over GPT-2's f32 parameters
  (fwd_ms = one step).

Times are medians of CUDA-event timings after warm-up, on random (never zero) inputs.
Backward passes are `torch.autograd.grad(y, inputs, dy)` with a given dy, as temper's benches
call their backward kernels: no scalar loss, and no `.grad` accumulation (which would add an
elementwise pass per input to every repeat after the first).

Usage: python3 scripts/bench_peers.py [--quick] [SECTION ...]   (sections: device copy
attention attention_packed attention_softcap lora rmsnorm gae allreduce train_ops; default
all). scripts/gpu-check.sh runs one section per process, each under
its own timeout.
"""

import json
import statistics
import sys

import torch
import torch.nn.functional as F

QUICK = "--quick" in sys.argv


def emit(**kw):
    # `pass` is a Python keyword: callers write pass_.
    print(json.dumps({("pass" if k == "pass_" else k): v for k, v in kw.items()}), flush=True)


def time_ms(fn, reps=20, warmup=3):
    """Median ms per call between CUDA events, the repeats queued back to back and one wait at
    the end (benches/common times temper the same way): where a call's GPU work outlasts the
    host's, the events time the GPU alone."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    n = reps if not QUICK else max(3, reps // 4)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for b, h, s, d in [(8, 16, 2048, 128), (16, 32, 1024, 64), (8, 8, 2048, 256)]:
        shape = f"B{b} H{h} S{s} D{d}"
        fwd_flops = 4 * b * h * s * s * d / 2
        q, k, v, dy = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        inputs = (qg, kg, vg)
        backends = [("torch-flash", SDPBackend.FLASH_ATTENTION), ("torch-cudnn", SDPBackend.CUDNN_ATTENTION)]
        for name, backend in backends:
            try:
                with sdpa_kernel([backend]):
                    fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

                    def both():
                        y = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                        torch.autograd.grad(y, inputs, dy)

                    fb = time_ms(both)
            except RuntimeError as e:  # backend unavailable for this shape or build
                emit(bench="attention", shape=shape, impl=name, error=str(e).splitlines()[0])
                continue
            emit(bench="attention", shape=shape, impl=name, pass_="fwd", ms=fwd, tflops=fwd_flops / fwd / 1e9)
            emit(bench="attention", shape=shape, impl=name, pass_="fwd+bwd", ms=fb, tflops=3.5 * fwd_flops / fb / 1e9)
        if d == 128:
            mask = torch.ones(s, s, device="cuda", dtype=torch.bool).tril()

            def materialised(qq, kk, vv):
                att = (qq @ kk.transpose(-1, -2)) * (d ** -0.5)
                att = att.masked_fill(~mask, float("-inf")).softmax(-1)
                return att @ vv

            fwd = time_ms(lambda: materialised(q, k, v), reps=5)
            emit(bench="attention", shape=shape, impl="torch-math", pass_="fwd", ms=fwd, tflops=fwd_flops / fwd / 1e9)
    # Decode: one query row per head against T keys, SDPA's own backend choice (as
    # transformers' generate calls it); the shapes of benches/attention.rs.
    for b, hq, hkv, t, d in [(64, 12, 12, 320, 64), (16, 32, 8, 2048, 128), (64, 4, 1, 1024, 256)]:
        shape = f"decode B{b} Hq{hq} Hkv{hkv} T{t} D{d}"
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv), reps=50)
        emit(bench="attention_decode", shape=shape, impl="torch-sdpa", ms=ms, gbps=2 * b * hkv * t * d * 2 / ms / 1e6)


def measure_attention(bench, shape, name, attend, inputs, grad_inputs, dy, fwd_flops):
    """One attention peer's fwd and fwd+bwd (the backward to `grad_inputs`, driven by dy): ms
    and TFLOP/s from the forward's `fwd_flops` (fwd+bwd 3.5x). A peer that cannot run is
    reported, not fatal."""
    try:
        fwd = time_ms(lambda: attend(*inputs))

        def both():
            torch.autograd.grad(attend(*grad_inputs), grad_inputs, dy)

        fb = time_ms(both)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        emit(bench=bench, shape=shape, impl=name, error=str(e).splitlines()[0])
        return
    emit(bench=bench, shape=shape, impl=name, pass_="fwd", ms=fwd, tflops=fwd_flops / fwd / 1e9)
    emit(bench=bench, shape=shape, impl=name, pass_="fwd+bwd", ms=fb, tflops=3.5 * fwd_flops / fb / 1e9)


PACKED_DOCS = [300, 50, 700, 128, 17, 512, 90, 3, 248]


def attention_packed():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, s, d = 8, 16, 2048, 128
    assert sum(PACKED_DOCS) == s
    shape = f"packed B{b} H{h} S{s} D{d}"
    fwd_flops = 4 * b * h * d * sum(n * (n + 1) // 2 for n in PACKED_DOCS)
    doc = torch.repeat_interleave(
        torch.arange(len(PACKED_DOCS), device="cuda"), torch.tensor(PACKED_DOCS, device="cuda")
    )
    q, k, v, dy = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

    def document_causal(bb, hh, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    def measure(name, attend):
        measure_attention("attention_packed", shape, name, attend, (q, k, v), (qg, kg, vg), dy, fwd_flops)

    mask = create_block_mask(document_causal, B=None, H=None, Q_LEN=s, KV_LEN=s, device="cuda")
    flex = torch.compile(flex_attention)
    measure("torch-flex", lambda qq, kk, vv: flex(qq, kk, vv, block_mask=mask))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        measure("torch-flash-causal", lambda qq, kk, vv: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True))


def attention_softcap():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, hq, hkv, s, d, cap = 4, 8, 4, 2048, 256, 50.0
    shape = f"softcap B{b} Hq{hq} Hkv{hkv} S{s} D{d}"
    fwd_flops = 4 * b * hq * s * s * d / 2
    scale = d ** -0.5
    q, dy = (torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    causal = torch.full((s, s), float("-inf"), device="cuda", dtype=torch.bfloat16).triu(1)

    def eager(qq, kk, vv):
        # transformers' Gemma 2 eager attention: its default for Gemma 2.
        kk, vv = (x.repeat_interleave(hq // hkv, dim=1) for x in (kk, vv))
        w = (qq @ kk.transpose(-1, -2)) * scale
        w = torch.tanh(w / cap) * cap + causal
        w = w.softmax(-1, dtype=torch.float32).to(qq.dtype)
        return w @ vv

    def capped(score, bb, hh, qi, ki):
        return cap * torch.tanh(score / cap)

    def is_causal(bb, hh, qi, ki):
        return qi >= ki

    mask = create_block_mask(is_causal, B=None, H=None, Q_LEN=s, KV_LEN=s, device="cuda")
    flex = torch.compile(flex_attention)

    def flexed(qq, kk, vv):
        return flex(qq, kk, vv, score_mod=capped, block_mask=mask, scale=scale, enable_gqa=True)

    for name, attend in [("torch-eager", eager), ("torch-flex", flexed)]:
        measure_attention("attention_softcap", shape, name, attend, (q, k, v), (qg, kg, vg), dy, fwd_flops)


def lora():
    for r, m, k, n in [(16, 8192, 4096, 4096), (8, 4096, 768, 768)]:
        shape = f"r{r} M{m} K{k} N{n}"
        dt = torch.bfloat16
        x = torch.randn(m, k, device="cuda", dtype=dt, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5
        a = (torch.randn(r, k, device="cuda", dtype=dt) / k ** 0.5).requires_grad_(True)
        bm = (torch.randn(n, r, device="cuda", dtype=dt) * 0.1).requires_grad_(True)
        dy = torch.randn(m, n, device="cuda", dtype=dt)
        s = 2.0

        def plain():
            return x @ w.t()

        def unfused():
            return x @ w.t() + s * ((x @ a.t()) @ bm.t())

        # What each variant's backward must produce with W frozen: dx, and dA, dB for LoRA.
        for name, f, wrt in [("torch-plain", plain, (x,)), ("torch-unfused", unfused, (x, a, bm))]:
            with torch.no_grad():
                fwd = time_ms(f)
            fb = time_ms(lambda: torch.autograd.grad(f(), wrt, dy))
            emit(bench="lora", shape=shape, impl=name, fwd_ms=fwd, fwd_bwd_ms=fb)


def rmsnorm():
    # F.rms_norm (PyTorch's own; under torch.compile it would be fused differently, but eager
    # is what a plain trainer runs) at benches/rmsnorm.rs's shapes.
    for rows, cols in [(16384, 768), (8192, 4096)]:
        dt = torch.bfloat16
        x = torch.randn(rows, cols, device="cuda", dtype=dt, requires_grad=True)
        w = (1 + 0.1 * torch.randn(cols, device="cuda")).to(dt).requires_grad_(True)
        dy = torch.randn(rows, cols, device="cuda", dtype=dt)

        def f():
            return F.rms_norm(x, (cols,), w, eps=1e-5)

        with torch.no_grad():
            fwd = time_ms(f, reps=50)
        fb = time_ms(lambda: torch.autograd.grad(f(), (x, w), dy), reps=50)
        elem = rows * cols * 2
        emit(bench="rmsnorm", shape=f"{rows}x{cols}", impl="torch", fwd_ms=fwd, fwd_bwd_ms=fb,
             fwd_gbps=2 * elem / fwd / 1e6, fwd_bwd_gbps=5 * elem / fb / 1e6)


def gae():
    gamma, lam = 0.99, 0.95
    for b, t in [(512, 1024), (4096, 4096)]:
        rewards = torch.randn(b, t, device="cuda")
        values = torch.randn(b, t, device="cuda")

        def trl_loop():
            # TRL experimental/ppo: the reverse recurrence one time step per iteration.
            lastgaelam = 0
            adv = []
            for i in reversed(range(t)):
                nextvalues = values[:, i + 1] if i < t - 1 else 0.0
                delta = rewards[:, i] + gamma * nextvalues - values[:, i]
                lastgaelam = delta + gamma * lam * lastgaelam
                adv.append(lastgaelam)
            adv = torch.stack(adv[::-1], dim=1)
            return adv, adv + values

        ms = time_ms(trl_loop, reps=5, warmup=1)
        emit(bench="gae", shape=f"B{b} T{t}", impl="torch-trl-loop", ms=ms)


def gpt2_params(vocab=50304, hidden=768, mlp=3072, layers=12, ctx=1024):
    # GPT-2's parameters as temper's model holds them (benches/train_ops.rs's gpt2_params):
    # (shape, weight decay). The q, k, v and output projections are apart, as in temper.
    norm = [((hidden,), False), ((hidden,), False)]
    p = [((vocab, hidden), False), ((ctx, hidden), False)]
    for _ in range(layers):
        p += norm
        for _ in range(4):
            p += [((hidden, hidden), True), ((hidden,), False)]
        p += norm
        p += [((mlp, hidden), True), ((mlp,), False), ((hidden, mlp), True), ((hidden,), False)]
    return p + norm


def train_ops():
    # PyTorch eager as a plain trainer runs each op, at benches/train_ops.rs's shapes; GB/s
    # from that bench's byte counts (the fewest bytes each forward moves), so both sides'
    # GB/s are the same bytes over each one's time. Each op's tensors are freed before the
    # next op's are made (the loss head's take several GB).
    dt, e = torch.bfloat16, 2
    batch, seq, hidden, mlp, vocab = 16, 1024, 768, 3072, 50304
    rows = batch * seq

    def randn(*shape, dtype=dt, std=1.0, grad=False):
        return (std * torch.randn(*shape, device="cuda")).to(dtype).requires_grad_(grad)

    def measure(op, shape, f, inputs, dy, nbytes):
        with torch.no_grad():
            fwd = time_ms(f)
        fb = time_ms(lambda: torch.autograd.grad(f(), inputs, dy))
        emit(bench="train_ops", op=op, shape=shape, impl="torch", drive="autograd.grad", fwd_ms=fwd,
             fwd_bwd_ms=fb, gbps=nbytes / fwd / 1e6)

    def layernorm():
        # Weight and bias in the input's dtype, one dtype throughout as F.layer_norm is called
        # outside autocast (temper's kernel reads the f32 masters: 6 KB either way).
        x = randn(rows, hidden, grad=True)
        w = (1 + randn(hidden, dtype=torch.float32, std=0.1)).to(dt).requires_grad_(True)
        b = randn(hidden, std=0.1, grad=True)
        measure("layernorm", f"{rows}x{hidden}", lambda: F.layer_norm(x, (hidden,), w, b, eps=1e-5),
                (x, w, b), randn(rows, hidden), 2 * rows * hidden * e + 8 * hidden)

    def gelu():
        x = randn(rows, mlp, grad=True)
        measure("gelu", f"{rows}x{mlp}", lambda: F.gelu(x, approximate="tanh"), (x,), randn(rows, mlp),
                2 * rows * mlp * e)

    def bias(op, cols, act):
        # The f32 master bias cast to the activation's dtype, as autocast casts it for a
        # GEMM's epilogue; its gradient flows back through the cast to f32.
        y = randn(rows, cols, grad=True)
        b = randn(cols, dtype=torch.float32, std=0.1, grad=True)
        measure(op, f"{rows}x{cols}", lambda: act(y + b.to(dt)), (y, b), randn(rows, cols),
                2 * rows * cols * e + 4 * cols)

    def gated(op, act):
        g, u = randn(rows, mlp, grad=True), randn(rows, mlp, grad=True)
        measure(op, f"{rows}x{mlp}", lambda: act(g) * u, (g, u), randn(rows, mlp), 3 * rows * mlp * e)

    def rope():
        # transformers' apply_rotary_pos_emb on the queries: x cos + rotate_half(x) sin, with
        # the tables at full head width as it builds them.
        heads, hd = 12, hidden // 12
        x = randn(batch, heads, seq, hd, grad=True)
        cos, sin = randn(batch, 1, seq, hd), randn(batch, 1, seq, hd)

        def rotate_half(z):
            return torch.cat((-z[..., hd // 2:], z[..., : hd // 2]), dim=-1)

        measure("rope", f"B{batch} H{heads} T{seq} D{hd}", lambda: x * cos + rotate_half(x) * sin, (x,),
                randn(batch, heads, seq, hd), (2 * batch * heads * seq * hd + batch * seq * hd) * e)

    def heads():
        # The queries' projection into heads, as GPT-2 trainers write it: view, transpose,
        # contiguous (what SDPA is handed).
        h, hd = 12, hidden // 12
        x = randn(batch, seq, hidden, grad=True)
        measure("heads", f"B{batch} T{seq} H{h} D{hd}",
                lambda: x.view(batch, seq, h, hd).transpose(1, 2).contiguous(), (x,),
                randn(batch, h, seq, hd), 2 * rows * hidden * e)

    def embedding():
        # Token rows plus position rows broadcast over the batch, as GPT-2 trainers write it,
        # from f32 tables; cast to bf16, the dtype temper's lookup gives.
        ids = torch.randint(0, vocab, (batch, seq), device="cuda")
        pos = torch.arange(seq, device="cuda")
        wte = randn(vocab, hidden, dtype=torch.float32, std=0.02, grad=True)
        wpe = randn(seq, hidden, dtype=torch.float32, std=0.01, grad=True)
        measure("embedding", f"B{batch} T{seq} V{vocab} H{hidden}",
                lambda: (F.embedding(ids, wte) + F.embedding(pos, wpe)).to(dt), (wte, wpe),
                randn(batch, seq, hidden), 4 * rows + 4 * rows * hidden + 4 * seq * hidden + e * rows * hidden)

    def logprobs():
        # Per-token cross-entropy (minus the log-probability temper's op gives) over the bf16
        # logits upcast to f32, as autocast runs cross_entropy; backward to the bf16 logits.
        logits = randn(rows, vocab, grad=True)
        targets = torch.randint(0, vocab, (rows,), device="cuda")
        measure("logprobs", f"{rows}x{vocab}",
                lambda: F.cross_entropy(logits.float(), targets, reduction="none"), (logits,),
                randn(rows, dtype=torch.float32), e * rows * vocab + 8 * rows)

    def logprobs_entropy():
        # The same with the softmax's entropy, as TRL's GRPO and PPO take it from the f32
        # logits: log_softmax once, the target's entry and -(p * logp).sum, stacked [2, rows].
        logits = randn(rows, vocab, grad=True)
        targets = torch.randint(0, vocab, (rows,), device="cuda")

        def both():
            lp = F.log_softmax(logits.float(), dim=-1)
            return torch.stack([lp.gather(-1, targets[:, None])[:, 0], -(lp.exp() * lp).sum(-1)])

        measure("logprobs_entropy", f"{rows}x{vocab}", both, (logits,),
                randn(2, rows, dtype=torch.float32), e * rows * vocab + 12 * rows)

    def adamw():
        # One optimizer step as scripts/gpt2_peer.py takes it: clipping to norm 1.0, then fused
        # AdamW over f32 parameters and f32 gradients (autocast's layout; temper's side reads
        # the matrices' gradients in bf16 and writes bf16 compute copies); weight decay on the
        # matrices only, as temper. Gradients stay set between steps (clipping rescales them
        # in place, as it would each step).
        shapes = gpt2_params(vocab, hidden, mlp, 12, seq)
        params = [randn(*s, dtype=torch.float32, std=0.02, grad=True) for s, _ in shapes]
        for p in params:
            p.grad = 1e-3 * torch.randn_like(p)
        groups = [{"params": [p for p, (_, d) in zip(params, shapes) if d], "weight_decay": 0.1},
                  {"params": [p for p, (_, d) in zip(params, shapes) if not d], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)

        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        ms = time_ms(step)
        n = sum(p.numel() for p in params)
        emit(bench="train_ops", op="adamw", shape=f"{n} params", impl="torch", drive=None, fwd_ms=ms,
             fwd_bwd_ms=None, gbps=32 * n / ms / 1e6)

    tanh_gelu = lambda z: F.gelu(z, approximate="tanh")  # noqa: E731
    for f in [layernorm, gelu, lambda: bias("bias", hidden, lambda z: z),
              lambda: bias("bias_gelu", mlp, tanh_gelu), lambda: gated("swiglu", F.silu),
              lambda: gated("geglu", tanh_gelu), rope, heads, embedding, logprobs, logprobs_entropy,
              adamw]:
        f()
        torch.cuda.empty_cache()


def copy_bandwidth():
    n = 1 << 28  # 1 GiB of f32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    emit(bench="copy", impl="torch", ms=ms, gbps=2 * src.numel() * 4 / ms / 1e6)


def allreduce():
    # PyTorch DDP's gradient all-reduce at world size 1 over NCCL, for GPT-2 124M's parameter
    # count: one flat buffer, and DDP's 25 MB buckets. temper's bench-allreduce is the same.
    import os
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    n = 124_439_808
    flat = torch.randn(n, device="cuda")
    bucket = 25 * 1024 * 1024 // 4
    chunks = list(flat.split(bucket))
    ms_flat = time_ms(lambda: dist.all_reduce(flat, op=dist.ReduceOp.AVG))
    ms_buckets = time_ms(lambda: [dist.all_reduce(c, op=dist.ReduceOp.AVG) for c in chunks])
    for impl, ms in [("torch-one-buffer", ms_flat), ("torch-buckets", ms_buckets)]:
        emit(bench="allreduce", shape="gpt2-124m world1", impl=impl, ms=ms, gbps=n * 4 / ms / 1e6)
    dist.destroy_process_group()


def main():
    if not torch.cuda.is_available():
        print("bench_peers: no CUDA device", file=sys.stderr)
        sys.exit(1)
    sections = {
        "device": lambda: emit(
            bench="device", name=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda
        ),
        "copy": copy_bandwidth,
        "attention": attention,
        "attention_softcap": attention_softcap,
        "attention_packed": attention_packed,
        "lora": lora,
        "rmsnorm": rmsnorm,
        "gae": gae,
        "allreduce": allreduce,
        "train_ops": train_ops,
    }
    wanted = [a for a in sys.argv[1:] if not a.startswith("--")] or list(sections)
    unknown = [w for w in wanted if w not in sections]
    if unknown:
        print(f"bench_peers: unknown section(s) {unknown}; known: {list(sections)}", file=sys.stderr)
        sys.exit(2)
    for name in wanted:
        sections[name]()


if __name__ == "__main__":
    main()
