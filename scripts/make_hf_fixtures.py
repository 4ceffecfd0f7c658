"""Build the tiny Hugging Face checkpoints under tests/fixtures/hf/.

Each fixture is a random-weight model of one architecture family (llama, qwen2,
qwen3, mistral, smollm3, gemma2, gemma3, gpt2; gemma3_mm is Gemma 3's image-and-text model, a tiny
vision tower beside a gemma3 language model whose full layers scale their rotary positions), saved exactly as `transformers`' `save_pretrained` writes it
(config.json, model.safetensors, generation_config.json) together with a tiny
byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json with a chat
template) and an `expected.json` holding reference logits and greedy tokens
computed by `transformers` in float32. `llama_lora/` is a PEFT LoRA adapter for
the llama fixture, with the adapted and merged logits. `llama_rm/` is a reward
model as TRL's RewardTrainer saves one (LlamaForSequenceClassification, one
label, its padding id also its EOS), with its scores of the test sequences;
`llama_rm_lora/` one saved with a peft_config (a LoRA adapter on the llama fixture, its
score head saved whole, its tokenizer padding with EOS), with its scores.

The Rust tests (CI) only READ these files; nothing in CI runs this script.
To regenerate them (a few seconds on a CPU):

    python3 -m venv /tmp/hf-venv
    /tmp/hf-venv/bin/pip install torch transformers peft safetensors
    /tmp/hf-venv/bin/python scripts/make_hf_fixtures.py [FAMILY ...]

Naming families (llama, qwen2, qwen3, mistral, smollm3, gemma2, gemma3, gemma3_mm, gpt2) rebuilds
only those; the
llama_lora adapter and the llama_rm and llama_rm_lora reward models are rebuilt with llama
(either reward model alone: name it).

(Written against transformers 5.x, peft 0.21, tokenizers 0.23, torch 2.x.)
Everything is seeded, so a rerun with the same library versions reproduces the
same files. Note that transformers 5.x writes RoPE settings to config.json as a
`rope_parameters` object (holding `rope_theta` and any scaling), not as the
top-level `rope_theta` / `rope_scaling` of older checkpoints.
"""

import copy
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_REL = os.path.join("tests", "fixtures", "hf")
OUT = os.path.join(ROOT, OUT_REL)

SEED = 1234
VOCAB = 320  # model vocab (>= tokenizer size; the extra rows are padding, as in real models)
BPE_VOCAB = 300  # byte-level BPE: 256 byte tokens + merges (special tokens come on top)
MAX_POS = 64
GREEDY_NEW = 8

CORPUS = [
    "3+4=7", "12+5=17", "9+9=18", "1+1=2", "15+4=19", "7+8=15", "10+10=20",
    "Q: 3+4\nA: 7", "Q: 11+6\nA: 17", "Q: 2+9\nA: 11",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! This is a tiny tokenizer for tests.",
    "The model adds two numbers and writes the answer.",
    "A small model learns the sum of the numbers.",
    "user assistant system",
]

# Two fixed test sequences (lengths 7 and 12); every id is < 256, so valid for
# every tokenizer here (they are byte-level tokens or early merges).
INPUT_IDS = [
    [17, 200, 3, 99, 45, 128, 255],
    [5, 60, 61, 62, 250, 7, 0, 33, 144, 201, 12, 90],
]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


def build_tokenizer(front_specials, back_specials, bos=None):
    """Byte-level BPE trained on CORPUS. `front_specials` get ids 0.. (Mistral's
    <unk>/<s>/</s>), `back_specials` are appended after the BPE vocab (Llama-3,
    Qwen, GPT-2 put theirs at the end). If `bos` is given, encoding prepends it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB + len(front_specials),
        min_frequency=1,
        special_tokens=list(front_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(list(back_specials))
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def reinit(model):
    """Every parameter random: weights N(0, 0.1), biases N(0, 0.1), norm scales
    1 + N(0, 0.1) -- so a loader that drops a bias or a norm is caught."""
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied tensors appear once
            leaf = name.split(".")
            is_norm = any("norm" in part or part.startswith("ln_") for part in leaf)
            if is_norm and leaf[-1] == "weight":
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def greedy(model, ids, n):
    """Explicit argmax loop, full recompute each step (no KV cache, no
    generation_config involved)."""
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(logits_of(model, ids)[-1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def tensor_names(path):
    with safe_open(path, "pt") as f:
        return sorted([k, list(f.get_slice(k).get_shape())] for k in f.keys())


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
        f.write("\n")


def make(name, config, tok, tok_kwargs, chat_template, config_ids, gen_eos):
    """`config` already carries the token ids (`config_ids`) for config.json;
    they are copied into generation_config.json, whose eos becomes `gen_eos`."""
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    assert len(tok.get_vocab()) <= VOCAB, (name, len(tok.get_vocab()))
    for ids in INPUT_IDS:
        assert max(ids) < len(tok.get_vocab())

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    reinit(model)
    model.eval()
    gc = model.generation_config
    for k, v in config_ids.items():
        setattr(gc, k, v)
    gc.eos_token_id = gen_eos
    model.save_pretrained(d)
    assert os.path.exists(os.path.join(d, "generation_config.json")), name

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **tok_kwargs)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(d, save_jinja_files=False)  # chat_template inside tokenizer_config.json

    expected = {
        "input_ids": INPUT_IDS,
        "logits": [logits_of(model, ids).tolist() for ids in INPUT_IDS],
        "greedy": greedy(model, INPUT_IDS[0], GREEDY_NEW),
        "greedy_method": "explicit argmax loop, full recompute per step, no eos stop",
        "hf_tensor_names": tensor_names(os.path.join(d, "model.safetensors")),
    }
    write_json(os.path.join(d, "expected.json"), expected)
    return model


def from_root(load, name):
    """`load(path)` of fixture `name` by its path relative to the repository root, so that an
    adapter's adapter_config.json names its base portably."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return load(os.path.join(OUT_REL, name))
    finally:
        os.chdir(cwd)


def random_adapter(base, cfg, seed, d, also=lambda name, p: False):
    """`base` with LoRA `cfg`, its factors (PEFT starts B at 0) and the parameters `also`
    picks made random, saved to `d` with the config's module lists sorted (PEFT writes them
    from a Python set, whose order varies with the hash seed) and no model card."""
    from peft import get_peft_model

    shutil.rmtree(d, ignore_errors=True)
    pm = get_peft_model(base, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n or also(n, p):
                p.copy_(0.1 * torch.randn_like(p))
    pm.eval()
    pm.save_pretrained(d)
    ac_path = os.path.join(d, "adapter_config.json")
    ac = json.load(open(ac_path))
    for key in ["target_modules", "modules_to_save"]:
        if isinstance(ac.get(key), list):
            ac[key] = sorted(ac[key])
    with open(ac_path, "w") as f:
        json.dump(ac, f, indent=2, sort_keys=True)
        f.write("\n")
    if os.path.exists(os.path.join(d, "README.md")):
        os.remove(os.path.join(d, "README.md"))
    return pm


def make_lora():
    from peft import LoraConfig

    d = os.path.join(OUT, "llama_lora")
    base = from_root(lambda path: AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"), "llama")
    base.eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = random_adapter(base, cfg, SEED + 1, d)
    ids = INPUT_IDS[0]
    logits = logits_of(pm, ids)
    merged = pm.merge_and_unload()
    merged.eval()
    merged_logits = logits_of(merged, ids)
    assert torch.allclose(logits, merged_logits, atol=1e-5), (logits - merged_logits).abs().max()
    write_json(
        os.path.join(d, "expected.json"),
        {
            "input_ids": [ids],
            "logits": [logits.tolist()],
            "merged_logits": [merged_logits.tolist()],
            "adapter_tensor_names": tensor_names(os.path.join(d, "adapter_model.safetensors")),
        },
    )
    return logits


def rm_scores(model, pad):
    """The reward fixtures' sequences (INPUT_IDS and a third ending in two `pad`s) and
    `model`'s scores of them."""
    seqs = INPUT_IDS + [INPUT_IDS[0][:5] + [pad, pad]]
    with torch.no_grad():
        scores = [float(model(torch.tensor([ids])).logits[0, 0]) for ids in seqs]
    return seqs, scores


def make_rm(config, tok, tok_kwargs, pad):
    """A one-label LlamaForSequenceClassification (what TRL's RewardTrainer saves): its
    scores of INPUT_IDS and of a third sequence ending in two padding ids (here also the
    config's EOS, as where a tokenizer pads with EOS), read by transformers at each
    sequence's last token that is not the padding id."""
    d = os.path.join(OUT, "llama_rm")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    config = copy.deepcopy(config)
    config.num_labels = 1
    config.pad_token_id = pad
    torch.manual_seed(SEED + 2)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32, attn_implementation="eager")
    reinit(model)
    model.eval()
    model.save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=tok, **tok_kwargs).save_pretrained(d, save_jinja_files=False)
    seqs, scores = rm_scores(model, pad)
    write_json(
        os.path.join(d, "expected.json"),
        {"input_ids": seqs, "scores": scores,
         "hf_tensor_names": tensor_names(os.path.join(d, "model.safetensors"))},
    )
    m = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
    _, again = rm_scores(m, pad)
    assert max(abs(a - b) for a, b in zip(scores, again)) < 1e-6, (scores, again)


def make_rm_lora(tok, tok_kwargs, pad):
    """A LoRA reward model as TRL's RewardTrainer saves one with the peft_config of its
    documentation, `LoraConfig(modules_to_save=["score"])` (no task type): LoRA on q_proj and
    v_proj of the llama fixture (a causal LM, loaded as a one-label
    LlamaForSequenceClassification) and the new score head saved whole, with the tokenizer
    TRL trained with beside it. That tokenizer names no padding token, so TRL pads with its
    EOS (`pad`) and sets the classifier's pad_token_id to it, not the base's padding token;
    the scores of llama_rm's sequences, the third ending in two of them."""
    from peft import LoraConfig

    d = os.path.join(OUT, "llama_rm_lora")
    base = from_root(lambda path: AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, pad_token_id=pad, dtype=torch.float32, attn_implementation="eager"),
        "llama")
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                     modules_to_save=["score"])
    # The score head's trainable copy (modules_to_save) is what the adapter saves.
    pm = random_adapter(base, cfg, SEED + 3, d, lambda n, p: "score" in n and p.requires_grad)
    PreTrainedTokenizerFast(tokenizer_object=tok, **tok_kwargs).save_pretrained(d, save_jinja_files=False)
    seqs, scores = rm_scores(pm, pad)
    write_json(
        os.path.join(d, "expected.json"),
        {"input_ids": seqs, "scores": scores, "pad_token_id": pad,
         "adapter_tensor_names": tensor_names(os.path.join(d, "adapter_model.safetensors"))},
    )


def verify(name):
    """Reload with AutoModelForCausalLM and check the logits reproduce exactly."""
    d = os.path.join(OUT, name)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    exp = json.load(open(os.path.join(d, "expected.json")))
    for ids, want in zip(exp["input_ids"], exp["logits"]):
        got = logits_of(m, ids)
        diff = (got - torch.tensor(want)).abs().max().item()
        assert diff < 1e-5, (name, diff)
    assert greedy(m, exp["input_ids"][0], GREEDY_NEW) == exp["greedy"], name


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "smollm3", "gemma2", "gemma3", "gemma3_mm", "gpt2"]


def main(only):
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    common = dict(vocab_size=VOCAB, tie_word_embeddings=False)

    # --- llama (Llama-3 style: llama3 RoPE scaling, specials at the end, BOS prepended)
    llama_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok = build_tokenizer([], llama_specials, bos="<|begin_of_text|>")
    bot, eot_text, eot_id = (tok.token_to_id(t) for t in llama_specials[:3])
    cfg = LlamaConfig(
        **common, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=MAX_POS,
        bos_token_id=bot, eos_token_id=eot_text,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
    )
    llama_cfg, llama_pad = cfg, eot_text
    if "llama" in only:
        make("llama", cfg, tok,
             dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"),
             LLAMA3_TEMPLATE, dict(bos_token_id=bot, eos_token_id=eot_text), [eot_text, eot_id])

    # --- qwen2 (ChatML; q/k/v biases; tied embeddings; a sliding window of 4 positions in
    # the second layer, the first below max_window_layers)
    qwen_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = build_tokenizer([], qwen_specials)
    eot, _, im_end = (tok.token_to_id(t) for t in qwen_specials)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot,
    )
    if "qwen2" in only:
        make("qwen2", cfg, tok, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
             CHATML_TEMPLATE, dict(bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot), im_end)

    # --- qwen3 (ChatML; RMSNorm of each head's q and k; head_dim 16 != hidden/heads = 8, as
    # the real ones are wider than hidden/heads; no q/k/v biases; tied embeddings)
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, use_sliding_window=False, attention_bias=False,
        bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot,
    )
    if "qwen3" in only:
        make("qwen3", cfg, tok, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
             CHATML_TEMPLATE, dict(bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot), im_end)

    # --- smollm3 (ChatML; Llama's layout, the middle of three layers without rotary
    # positions: no_rope_layers [1, 0, 1]; tied embeddings)
    cfg = SmolLM3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
        no_rope_layers=[1, 0, 1], tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot,
    )
    if "smollm3" in only:
        make("smollm3", cfg, tok, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
             CHATML_TEMPLATE, dict(bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot), im_end)

    # --- mistral (head_dim 16 != hidden/heads = 8; <unk>,<s>,</s> at ids 0,1,2; a sliding
    # window of 4 positions, shorter than both test sequences and the greedy run)
    tok = build_tokenizer(["<unk>", "<s>", "</s>"], [], bos="<s>")
    s, es = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    cfg = MistralConfig(
        **common, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POS, sliding_window=4,
        bos_token_id=s, eos_token_id=es,
    )
    if "mistral" in only:
        make("mistral", cfg, tok, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
             MISTRAL_TEMPLATE, dict(bos_token_id=s, eos_token_id=es), es)

    # --- gemma3 (gemma3_text: <pad>,<eos>,<bos>,<unk> at ids 0..3, BOS prepended; norms after
    # each branch with gains 1 + w; GeGLU; embeddings scaled by sqrt(hidden); head_dim 16 and
    # query_pre_attn_scalar 12, so the attention scale is neither's default; a window of 4
    # in the first and last of three layers, which rotate by a base of their own)
    tok = build_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], ["<start_of_turn>", "<end_of_turn>"], bos="<bos>")
    gpad, geos, gbos = (tok.token_to_id(t) for t in ["<pad>", "<eos>", "<bos>"])
    eot_turn = tok.token_to_id("<end_of_turn>")
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, rms_norm_eps=1e-6,
        max_position_embeddings=MAX_POS, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        tie_word_embeddings=True, bos_token_id=gbos, eos_token_id=geos, pad_token_id=gpad,
    )
    if "gemma3" in only:
        make("gemma3", cfg, tok, dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
             GEMMA_TEMPLATE, dict(bos_token_id=gbos, eos_token_id=geos, pad_token_id=gpad), [geos, eot_turn])

    # --- gemma2 (Gemma 3's tokenizer and layout without the norms of q and k or the second
    # rotary base, and with its caps: scores at 2.0 and logits at 3.0, low enough to bind
    # on these random weights; the first and last of three layers slide a window of 4)
    cfg2 = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, rms_norm_eps=1e-6,
        max_position_embeddings=MAX_POS, sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, tie_word_embeddings=True, bos_token_id=gbos, eos_token_id=geos,
        pad_token_id=gpad,
    )
    if "gemma2" in only:
        make("gemma2", cfg2, tok, dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
             GEMMA_TEMPLATE, dict(bos_token_id=gbos, eos_token_id=geos, pad_token_id=gpad), [geos, eot_turn])

    # --- gemma3_mm (Gemma3ForConditionalGeneration, as Gemma 3 4B and up: a one-layer vision
    # tower and projector beside the gemma3 language model above, whose full layer divides its
    # rotary frequencies by 8; the image token ids sit inside the tiny vocabulary)
    text = Gemma3TextConfig(**{**cfg.to_dict(), "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }})
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    mm = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                      boi_token_index=310, eoi_token_index=311, image_token_index=312,
                      bos_token_id=gbos, eos_token_id=geos, pad_token_id=gpad)
    if "gemma3_mm" in only:
        make("gemma3_mm", mm, tok, dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
             GEMMA_TEMPLATE, dict(bos_token_id=gbos, eos_token_id=geos, pad_token_id=gpad), [geos, eot_turn])

    # --- gpt2 (Conv1D weights, fused c_attn, learned positions, tied head)
    tok = build_tokenizer([], ["<|endoftext|>"])
    e = tok.token_to_id("<|endoftext|>")
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POS, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=e, eos_token_id=e,
    )
    if "gpt2" in only:
        make("gpt2", cfg, tok, dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
             None, dict(bos_token_id=e, eos_token_id=e), e)

    if "llama" in only:
        make_lora()
    if "llama" in only or "llama_rm" in only:
        tok = build_tokenizer([], llama_specials, bos="<|begin_of_text|>")
        make_rm(llama_cfg, tok, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                     pad_token="<|end_of_text|>"), llama_pad)
    if "llama" in only or "llama_rm_lora" in only:
        tok = build_tokenizer([], llama_specials, bos="<|begin_of_text|>")
        make_rm_lora(tok, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), eot_id)

    for name in only:
        if name in FAMILIES:
            verify(name)
    print("wrote and verified", OUT, file=sys.stderr)


if __name__ == "__main__":
    wanted = sys.argv[1:] or FAMILIES
    extra = ["llama_rm", "llama_rm_lora"]
    unknown = [f for f in wanted if f not in FAMILIES + extra]
    assert not unknown, f"unknown families {unknown}; known: {FAMILIES} and {extra}"
    main(wanted)
