#!/usr/bin/env python3
"""Hugging Face transformers' `generate`, the peer of benches/generate.rs, same shapes, same GPU.

A GPT2LMHeadModel from a default GPT2Config (GPT-2 small: 12 layers, 768 wide, vocab 50257)
with random weights, in bf16; 64 prompts of 256 random tokens; 128 new tokens each, sampled at
temperature 0.7 with no top-k or top-p filter (transformers' default top_k=50 is switched off,
as temper's engine applies none), and `min_new_tokens=max_new_tokens=128` so every row runs all
128 steps, as the temper bench does. Prints tokens/s (prompts x new tokens over the median
wall time of `generate`, CUDA-synchronised) and one JSON line in benches/generate.rs's format.

With `--model qwen3`, a Qwen3ForCausalLM of Qwen3-0.6B's shape instead (28 layers of 1024, 16
query heads of 128 on 8 kv heads, q/k head norms, vocabulary 151936, tied embeddings), the peer
of `bench-generate --model qwen3`.

With `--penalty R`, `generate` also takes `repetition_penalty=R`, the peer of
`bench-generate --penalty R`; with `--top-k K`, `top_k=K` (transformers' own default is 50),
the peer of `bench-generate --top-k K`.

Usage: python3 scripts/bench_generate.py [--reps N] [--quick] [--model gpt2|qwen3] [--penalty R]
       [--top-k K]
"""

import json
import statistics
import sys
import time

B, L, N = 64, 256, 128


def arg(name, default):
    if name in sys.argv:
        return int(sys.argv[sys.argv.index(name) + 1])
    return default


def main():
    import torch

    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        print(json.dumps({"bench": "generate", "impl": "transformers-generate", "error": str(e)}))
        print(f"transformers is not installed here ({e}); no peer number")
        return 0
    reps = 1 if "--quick" in sys.argv else arg("--reps", 3)
    name = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "gpt2"
    penalty = float(sys.argv[sys.argv.index("--penalty") + 1]) if "--penalty" in sys.argv else 1.0
    top_k = int(sys.argv[sys.argv.index("--top-k") + 1]) if "--top-k" in sys.argv else 0
    torch.manual_seed(0)
    if name == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                          num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                          head_dim=128, max_position_embeddings=L + N, rms_norm_eps=1e-6,
                          tie_word_embeddings=True, eos_token_id=0)
        model = Qwen3ForCausalLM(cfg)
        label = f"qwen3 B{B} L{L} N{N}"
    elif name == "gpt2":
        cfg = GPT2Config()
        model = GPT2LMHeadModel(cfg)
        label = f"B{B} L{L} N{N}"
    else:
        raise SystemExit(f"--model {name}: expected gpt2 or qwen3")
    if penalty != 1.0:
        # As benches/generate.rs's label: Rust prints 1.05 as "1.05", 2.0 as "2".
        label += f" pen{penalty:g}"
    if top_k > 0:
        label += f" topk{top_k}"
    model = model.to(device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (B, L), device="cuda")
    mask = torch.ones_like(ids)

    def run(new):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=0.7,
                top_k=top_k,
                top_p=1.0,
                repetition_penalty=penalty,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=cfg.eos_token_id,
            )
        torch.cuda.synchronize()
        assert out.shape == (B, L + new), out.shape
        return time.perf_counter() - t0

    run(2)  # warm-up: kernels, allocator
    prefill = statistics.median(run(1) for _ in range(reps))
    total = statistics.median(run(N) for _ in range(reps))
    step = (total - prefill) / (N - 1)
    tps = B * N / total
    print(f"hf-transformers: {tps:10.0f} tokens/s ({total * 1e3:.1f} ms total, prefill {prefill * 1e3:.1f} ms, "
          f"decode step {step * 1e3:.3f} ms); torch {torch.__version__}")
    print(json.dumps({
        "bench": "generate", "impl": "transformers-generate", "shape": label,
        "tokens_per_s": tps, "ms_total": total * 1e3, "ms_prefill": prefill * 1e3,
        "ms_decode_step": step * 1e3,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
