#!/usr/bin/env python3
"""Checks temper's Hugging Face exports with transformers and PEFT themselves.

    python scripts/check_hf_export.py OUT_DIR

Exports each fixture of tests/fixtures/hf with `temper export --format hf` into OUT_DIR, loads
it with `AutoModelForCausalLM.from_pretrained`, and compares its logits with the fixture's
expected.json (recorded from the original model; the mistral and qwen2 fixtures slide a window
of 4 positions, as do two of the gemma3 fixture's three layers; gemma3_mm, an image-and-text
model, exports as its language model). Then it fine-tunes the llama, qwen2,
qwen3, smollm3, gemma2, gemma3, gemma3_mm and gpt2 fixtures with LoRA
for a few steps, exports the merged model and the adapter (`--format peft`; GPT-2's as one
adapter on c_attn),
and checks that `PeftModel.from_pretrained(base, adapter)` gives the merged model's logits, and
that `AutoTokenizer` reads from both the chat template the fine-tuning was given; and
the llama_rm reward model, exported, scores as the original under
`AutoModelForSequenceClassification`, as does the llama_rm_lora adapter (TRL's LoRA reward
model), merged and exported, against the PEFT model's scores. Adapters PEFT makes itself
with DoRA (`use_dora`) and rsLoRA (`use_rslora`) on the llama and gpt2 fixtures, merged by
temper and exported, give the PEFT model's logits, and an rsLoRA fine-tune's adapter
(`--use-rslora`) gives its merged export's under PEFT, and a byte-level run's export has a
tokenizer.json that transformers encodes as temper does. Needs the
venv of scripts/make_hf_fixtures.py and a built temper (`cargo build`); CI does not run it.
"""

import json
import os
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPER = os.environ.get("TEMPER", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "temper"))


def temper(*args):
    subprocess.run([TEMPER, *args], check=True, stdout=subprocess.DEVNULL)


def logits(model_dir, ids):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]


def peft_made_adapters(out):
    """DoRA and rsLoRA adapters made and saved by PEFT (random factors and magnitudes), each
    merged by temper (`export --format hf` of the adapter directory): max |diff| of the
    export's logits from the PEFT model's."""
    from peft import LoraConfig, get_peft_model

    worst = 0.0
    ids = [17, 200, 3, 99, 45, 128, 255]
    for fam, targets in [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])]:
        for kind in ["dora", "rslora", "dora+rslora"]:
            src = os.path.join(ROOT, "tests/fixtures/hf", fam)
            base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                             use_dora="dora" in kind, use_rslora="rslora" in kind,
                             task_type="CAUSAL_LM")
            pm = get_peft_model(base, cfg)
            torch.manual_seed(7)
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_magnitude_vector" in n:
                        # Near the base's row norms, where PEFT starts them, moved enough to matter.
                        p.add_(0.2 * p.abs().mean() * torch.randn_like(p))
                    elif "lora_" in n:
                        p.copy_(0.1 * torch.randn_like(p))
            pm.eval()
            adapter = os.path.join(out, f"peft-{fam}-{kind}")
            pm.save_pretrained(adapter)
            with open(os.path.join(adapter, "adapter_config.json")) as f:
                ac = json.load(f)
            ac["base_model_name_or_path"] = src
            with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
                json.dump(ac, f)
            with torch.no_grad():
                want = pm(torch.tensor([ids])).logits[0]
            merged = os.path.join(out, f"merged-peft-{fam}-{kind}")
            temper("export", "--checkpoint", adapter, "--out", merged, "--format", "hf")
            d = (logits(merged, ids) - want).abs().max().item()
            print(f"{fam} {kind}: PEFT's own adapter merged by temper vs the PEFT model: max |diff| {d:.2e}")
            worst = max(worst, d)
    return worst


def main(out):
    worst = 0.0
    for fam in ["llama", "qwen2", "qwen3", "mistral", "smollm3", "gemma2", "gemma3", "gemma3_mm", "gpt2"]:
        src = os.path.join(ROOT, "tests/fixtures/hf", fam)
        dst = os.path.join(out, fam)
        temper("export", "--checkpoint", src, "--out", dst, "--format", "hf")
        exp = json.load(open(os.path.join(src, "expected.json")))
        d = (logits(dst, exp["input_ids"][0]) - torch.tensor(exp["logits"][0])).abs().max().item()
        print(f"{fam}: transformers on temper's export vs the original: max |diff| {d:.2e}")
        worst = max(worst, d)
    # The reward model saved by transformers (one-label LlamaForSequenceClassification), and
    # TRL's LoRA one (a PEFT adapter on the llama fixture, which temper merges), through
    # temper's import and export, scored by transformers against the originals' scores.
    for fix in ["llama_rm", "llama_rm_lora"]:
        src = os.path.join(ROOT, "tests/fixtures/hf", fix)
        dst = os.path.join(out, fix)
        temper("export", "--checkpoint", src, "--out", dst, "--format", "hf")
        exp = json.load(open(os.path.join(src, "expected.json")))
        rm = AutoModelForSequenceClassification.from_pretrained(dst, dtype=torch.float32).eval()
        with torch.no_grad():
            got = [float(rm(torch.tensor([ids])).logits[0, 0]) for ids in exp["input_ids"]]
        d = max(abs(a - b) for a, b in zip(got, exp["scores"]))
        print(f"{fix}: transformers on temper's export of the reward model vs the original: max |diff| {d:.2e}")
        worst = max(worst, d)
    data = os.path.join(out, "sft.jsonl")
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n")
    template = os.path.join(out, "chat_template.jinja")
    with open(template, "w") as f:
        f.write("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    # GPT-2's q and v adapters leave as one block adapter on the c_attn they share (k's rows
    # zero), and its attn.c_proj and mlp.c_proj are told apart.
    # rsLoRA too, on llama and on GPT-2's joined c_attn (whose alpha_pattern keeps the scale).
    # gemma3_mm's adapter goes on the image-and-text model it was trained from (its merged
    # export is the language model alone): under its language model's names, off the vision
    # tower's projections.
    fams = ["llama", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3", "gemma3_mm", "gpt2"]
    runs = [(fam, []) for fam in fams]
    runs += [("llama", ["--use-rslora"]), ("gpt2", ["--use-rslora"])]
    for fam, extra in runs:
        name = fam + "".join(extra).replace("--", "-")
        sft = os.path.join(out, f"sft-{name}")
        targets = "q,v,o,down" if fam == "gpt2" else "q,k,v,o"
        temper("sft", "--init", os.path.join(ROOT, "tests/fixtures/hf", fam), "--data", data, "--out", sft,
               "--steps", "30", "--lora-rank", "4", "--lora-targets", targets, "--device", "cpu",
               "--chat-template", template, *extra)
        merged, adapter = os.path.join(out, f"merged-{name}"), os.path.join(out, f"adapter-{name}")
        temper("export", "--checkpoint", sft, "--out", merged, "--format", "hf")
        temper("export", "--checkpoint", sft, "--out", adapter, "--format", "peft")
        ids = torch.tensor([[17, 200, 3, 99, 45, 128, 255]])
        base_dir = os.path.join(ROOT, "tests/fixtures/hf", fam) if fam == "gemma3_mm" else os.path.join(out, fam)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        peft = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            d = (peft(ids).logits[0] - logits(merged, ids[0].tolist())).abs().max().item()
        print(f"{name}: PEFT adapter on the exported base vs temper's merged export: max |diff| {d:.2e}")
        worst = max(worst, d)
        for d in [merged, adapter]:
            if AutoTokenizer.from_pretrained(d).chat_template != open(template).read():
                print(f"{fam}: {d}: transformers does not read the chat template the run was given")
                worst = float("inf")
    worst = max(worst, peft_made_adapters(out))
    # A model on the built-in byte tokenizer exports with a tokenizer.json of it: transformers
    # must encode a text to its UTF-8 bytes, and find EOS (256) and PAD (257) by name.
    run, dst = os.path.join(out, "bytes-run"), os.path.join(out, "bytes-hf")
    temper("pretrain", "--out", run, "--steps", "2", "--device", "cpu")
    temper("export", "--checkpoint", run, "--out", dst, "--format", "hf")
    tok = AutoTokenizer.from_pretrained(dst)
    text = "2+3=5\n<|user|> héllo ~ \x7f"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    same = ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    same = same and (tok.eos_token_id, tok.pad_token_id) == (256, 257)
    print(f"byte tokenizer: transformers encodes as temper: {same}")
    if not same:
        worst = float("inf")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main(sys.argv[1])
