#!/usr/bin/env python3
"""PyTorch peer of benches/train_step.rs: one GPT-2 124M pretraining step, the way a plain
PyTorch trainer runs it, for tokens/s and peak memory beside temper's in the same device call.

The model is temper's `gpt2` preset (src/config/model.rs): 12 layers, 768 wide, 12 heads,
context 1024, vocabulary 50304, learned positions, LayerNorm, GELU MLP 3072, biases, tied
embeddings. The step is temper's: forward, cross-entropy, backward, global-norm clipping to 1.0,
AdamW; f32 weights with bf16 autocast (temper keeps f32 master weights and computes in bf16),
attention through SDPA (causal), AdamW with `fused=True`. `--compile` wraps the model in
torch.compile; its compilation happens in the warm-up steps, which are not timed.

Tokens/s comes from the median of the timed steps (each synchronised, host clock). Peak memory
is torch's own count (`max_memory_allocated`, `max_memory_reserved`); scripts/gpu-check.sh also
reads the process's peak from nvidia-smi, the same way it does for temper.

Prints one JSON line: {"bench": "train_step", "impl": "torch-eager" | "torch-compile", ...}.
Usage: python3 scripts/gpt2_peer.py [--compile] [--batch 16] [--seq 1024] [--steps 10]
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class Gpt2(nn.Module):
    def __init__(self, vocab=50304, ctx=1024, d=768, layers=12, heads=12):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as the preset
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpt2_peer: no CUDA device", file=sys.stderr)
        sys.exit(1)
    torch.manual_seed(0)
    dev = "cuda"
    model = Gpt2(ctx=max(1024, args.seq)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    step_model = torch.compile(model) if args.compile else model
    b, t = args.batch, args.seq
    data = torch.randint(0, 50257, (b, t + 1), device=dev)
    x, y = data[:, :t].contiguous(), data[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = step_model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        losses.append(loss.item())  # synchronises
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    n_params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "bench": "train_step",
                "impl": "torch-compile" if args.compile else "torch-eager",
                "batch": b,
                "seq": t,
                "params": n_params,
                "ms": round(ms, 3),
                "tokens_per_s": round(b * t / ms * 1e3, 1),
                "first_loss": round(losses[0], 5),
                "last_loss": round(losses[-1], 5),
                "warmup_s": round(warmup_s, 1),
                "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
