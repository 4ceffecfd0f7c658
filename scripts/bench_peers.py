#!/usr/bin/env python3
"""PyTorch peers for temper's kernel benches, at the same shapes, on the same GPU.

Prints one JSON object per line (the format benches/attention.rs and benches/lora.rs print),
so scripts/bench-all.sh can put ours and theirs in one table:

- attention: SDPA, causal bf16, B=8 H=16 S=2048 D=128 and B=16 H=32 S=1024 D=64, with the
  flash (FA2) and cuDNN backends, plus the materialised version (matmul, mask, softmax,
  matmul) at the first shape: fwd and fwd+bwd TFLOP/s (FLOPs as benches/attention.rs: 4·B·H·S²·D,
  halved when causal; fwd+bwd = 3.5x).
- lora: unfused LoRA (x W^T + s (x A^T) B^T, W frozen) over the plain GEMM x W^T, fwd and
  fwd+bwd, r=16 M=8192 K=N=4096 and r=8 M=4096 K=N=768.
- gae: the TRL-style loop `for t in reversed(range(T))` on the GPU at B=512,T=1024 and
  B=4096,T=4096.
- copy: device-to-device copy bandwidth (bytes read + written), the memory ceiling.

Times are medians of CUDA-event timings after warm-up, on random (never zero) inputs.
Usage: python3 scripts/bench_peers.py [--quick]
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
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps if not QUICK else max(3, reps // 4)):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for b, h, s, d in [(8, 16, 2048, 128), (16, 32, 1024, 64)]:
        shape = f"B{b} H{h} S{s} D{d}"
        fwd_flops = 4 * b * h * s * s * d / 2
        q, k, v, dy = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        backends = [("torch-flash", SDPBackend.FLASH_ATTENTION), ("torch-cudnn", SDPBackend.CUDNN_ATTENTION)]
        for name, backend in backends:
            try:
                with sdpa_kernel([backend]):
                    fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

                    def both():
                        y = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                        y.backward(dy)

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

        times = {}
        for name, f in [("torch-plain", plain), ("torch-unfused", unfused)]:
            with torch.no_grad():
                fwd = time_ms(f)
            fb = time_ms(lambda: f().backward(dy))
            times[name] = (fwd, fb)
        base = times["torch-plain"]
        for name, (fwd, fb) in times.items():
            emit(bench="lora", shape=shape, impl=name, fwd_ms=fwd, fwd_bwd_ms=fb, fwd_x=fwd / base[0], fwd_bwd_x=fb / base[1])


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


def copy_bandwidth():
    n = 1 << 28  # 1 GiB of f32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    emit(bench="copy", impl="torch", ms=ms, gbps=2 * src.numel() * 4 / ms / 1e6)


def main():
    if not torch.cuda.is_available():
        print("bench_peers: no CUDA device", file=sys.stderr)
        sys.exit(1)
    emit(bench="device", name=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda)
    copy_bandwidth()
    attention()
    lora()
    gae()


if __name__ == "__main__":
    main()
