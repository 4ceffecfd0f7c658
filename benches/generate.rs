//! The rollout engine's throughput: a GPT-2-small-shaped policy (random weights), 64 prompts
//! of 256 tokens, 128 new tokens each at temperature 0.7 (every row runs all 128: stops are
//! ignored, as `min_new_tokens` does in the Hugging Face peer, scripts/bench_generate.py).
//! Prints tokens/s, the time per decode step, and the memory-bandwidth floor of a decode
//! step: the bytes it must read (weights in the compute dtype plus the KV cache so far) over
//! the card's copy bandwidth (4.1 TB/s measured on the H200 with a device-to-device copy; gpu-check.sh measures it again). On a CPU it runs a
//! tiny shape, so the harness itself stays checked.
//!
//! `cargo bench --bench generate [-- --batch B --prompt L --new N --reps R --group G --plain 1
//! --decode graph|fixed|dynamic --model gpt2|qwen3 --penalty R --top-k K]`
//! `--model qwen3` times Qwen3-0.6B's shape instead (28 layers of 1024, 16 query heads of 128 on
//! 8 kv heads, RMSNorm of each q and k head, vocabulary 151936, tied embeddings), the model
//! most GRPO runs start from; its peer is `scripts/bench_generate.py --model qwen3`.
//! `--penalty R` samples under a repetition penalty R (Qwen2.5's generation config asks 1.05):
//! the sampling kernel then reads each row's seen-token mask and marks it, and the peer passes
//! `repetition_penalty=R` to `generate`.
//! `--top-k K` samples from each row's K most likely tokens (transformers' `generate` defaults
//! to 50): the sampling kernel then selects each row's K-th largest weight first; the peer
//! passes `top_k=K`.
//! `--group G` repeats each prompt G times back to back (a GRPO group: one shared prefill per
//! group); `--plain 1` switches the engine's savings off (no shared prefill, no compaction, a
//! dynamic-shape decode step); `--decode` picks the decode step (`src/generate/mod.rs`,
//! `DecodeMode`; graph by default).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use temper::config::ModelConfig;
use temper::data::tokenizer::Tokenizer;
use temper::generate::{generate, DecodeMode, EngineOpts, RowKeys, SampleCfg};
use temper::model::linear::Ctx;
use temper::model::Transformer;
use temper::train::params::{Net, ParamStore};

/// Device-to-device copy bandwidth of the H200 in bytes/s, as measured on 2026-11-29.
const COPY_BYTES_PER_S: f64 = 4.1e12;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Bytes one decode step must read at cache length `t`: every weight once in the compute
/// dtype, and the keys and values of every layer for every row.
fn step_bytes(cfg: &ModelConfig, params: usize, b: usize, t: usize, dtype: DType) -> f64 {
    let e = dtype.size_in_bytes() as f64;
    let kv = 2 * cfg.num_hidden_layers * b * cfg.num_key_value_heads * cfg.head_dim() * t;
    (params as f64 + kv as f64) * e
}

/// The policy's shape on a GPU: GPT-2 small, or Qwen3-0.6B's (its `config.json`'s numbers).
fn gpu_model(name: &str) -> Result<ModelConfig> {
    match name {
        "gpt2" => Ok(ModelConfig {
            vocab_size: 50257, // GPT-2's, as the peer's GPT2Config
            ..ModelConfig::preset("gpt2")?
        }),
        "qwen3" => Ok(ModelConfig {
            vocab_size: 151936,
            hidden_size: 1024,
            intermediate_size: 3072,
            num_hidden_layers: 28,
            num_attention_heads: 16,
            num_key_value_heads: 8,
            head_dim: Some(128),
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            qk_norm: true,
            ..ModelConfig::preset("small")?
        }),
        other => anyhow::bail!("--model {other}: expected gpt2 or qwen3"),
    }
}

fn main() -> Result<()> {
    let model = std::env::args()
        .skip_while(|a| a != "--model")
        .nth(1)
        .unwrap_or_else(|| "gpt2".into());
    let gpu_cfg = gpu_model(&model)?; // checked on a CPU too
    let (dev, mut cfg, dtype, b, l, n) = match Device::new_cuda(0) {
        Ok(d) => (d, gpu_cfg, DType::BF16, 64, 256, 128),
        Err(_) => {
            println!("generate: no CUDA device; timing a tiny shape on the CPU (the GPU comparison needs --features cuda and a GPU)");
            (
                Device::Cpu,
                ModelConfig::preset("tiny")?,
                DType::F32,
                4,
                16,
                8,
            )
        }
    };
    let b = arg("--batch", b);
    let l = arg("--prompt", l);
    let n = arg("--new", n);
    let reps = arg("--reps", 3).max(1);
    let group = arg("--group", 1).max(1);
    let plain = arg("--plain", 0) != 0;
    let penalty: f64 = match std::env::args().skip_while(|a| a != "--penalty").nth(1) {
        None => 1.0,
        Some(r) => r
            .parse()
            .map_err(|_| anyhow::anyhow!("--penalty {r}: expected a number"))?,
    };
    let top_k = arg("--top-k", 0);
    let decode = match std::env::args()
        .skip_while(|a| a != "--decode")
        .nth(1)
        .as_deref()
    {
        None if plain => DecodeMode::Dynamic,
        None | Some("graph") => DecodeMode::Graph,
        Some("fixed") => DecodeMode::Fixed,
        Some("dynamic") => DecodeMode::Dynamic,
        Some(other) => anyhow::bail!("--decode {other}: expected graph, fixed or dynamic"),
    };
    let engine = EngineOpts {
        compact: !plain,
        share_prefill: !plain,
        decode,
    };
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(l + n);
    let mut store = ParamStore::new(dev.clone(), 11);
    let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, None)?;
    let params = store.num_params(|_| true);
    let tok = Tokenizer::bytes();
    let ctx = Ctx::plain(dtype);
    let vocab = cfg.vocab_size as u64;
    let prompts: Vec<Vec<u32>> = (0..b as u64)
        .map(|r| r / group as u64)
        .map(|r| {
            (0..l as u64)
                .map(|j| (temper::train::rng::splitmix64(r * 1_000_003 + j) % vocab) as u32)
                .map(|id| match tok.is_stop(id) || id == tok.pad_id() {
                    true => 1,
                    false => id,
                })
                .collect()
        })
        .collect();
    let run = |new: usize, seed: u64| -> Result<f64> {
        let sc = SampleCfg {
            max_new_tokens: new,
            min_new_tokens: new,
            temperature: 0.7,
            repetition_penalty: penalty,
            top_k,
            engine,
            ..Default::default()
        };
        let t0 = Instant::now();
        let g = generate(&net, ctx, &tok, &prompts, &sc, &RowKeys::range(seed, 0, b))?;
        assert!(g.tokens.iter().all(|t| t.len() == new));
        if dev.is_cuda() && decode == DecodeMode::Graph && new > 2 {
            // Every step but the one captured is a replay.
            anyhow::ensure!(
                g.stats.graph_replays + 1 >= g.stats.decode_steps,
                "the decode step was not replayed as a CUDA graph: {:?}",
                g.stats
            );
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    // Loads the kernels; under TEMPER_GEMM_TUNE=timed also times cuBLASLt's candidates for the
    // prefill's GEMMs (the decode step's are timed before their graph is captured in any case).
    #[cfg(feature = "cuda")]
    temper::kernels::cuda::timing_first_calls(|| run(2, 0))?;
    #[cfg(not(feature = "cuda"))]
    run(2, 0)?;
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let prefill = median((0..reps).map(|r| run(1, r as u64)).collect::<Result<_>>()?);
    let total = median((0..reps).map(|r| run(n, r as u64)).collect::<Result<_>>()?);
    let step = (total - prefill) / (n - 1).max(1) as f64;
    let tokens_per_s = (b * n) as f64 / total;
    // The floor of the decode steps at their mean cache length.
    let floor_step = step_bytes(&cfg, params, b, l + n / 2, dtype) / COPY_BYTES_PER_S;
    println!(
        "shape: layers {} hidden {} vocab {} ({:.0}M parameters), {b} prompts x {l} tokens (groups of {group}), {n} new, T=0.7, {dtype:?}, {engine:?}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        params as f64 / 1e6
    );
    println!(
        "temper: {tokens_per_s:>10.0} tokens/s ({:.1} ms total, prefill {:.1} ms, decode step {:.3} ms)",
        total * 1e3,
        prefill * 1e3,
        step * 1e3
    );
    println!(
        "bandwidth floor of a decode step: {:.3} ms ({:.1} MB at 4.1 TB/s): the decode runs at {:.2}x the floor",
        floor_step * 1e3,
        step_bytes(&cfg, params, b, l + n / 2, dtype) / 1e6,
        step / floor_step
    );
    #[cfg(feature = "cuda")]
    {
        use temper::kernels::cuda::decode_gemm::{self, DecodeGemm};
        anyhow::ensure!(
            DecodeGemm::current() != DecodeGemm::Ours || decode_gemm::launches() > 0,
            "TEMPER_DECODE_GEMM=ours, but no GEMM of the run was ours (cuBLASLt served them all)"
        );
    }
    // Whether the timed graph could overlap its kernels (programmatic edges join two kernel
    // nodes only).
    #[cfg(feature = "cuda")]
    let graph = temper::generate::last_capture();
    #[cfg(not(feature = "cuda"))]
    let graph: Option<()> = None;
    if let Some(g) = &graph {
        println!("decode step's graph: {g:?}");
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "generate", "impl": impl_label(decode), "graph": graph, "shape": shape_label(if dev.is_cuda() { &model } else { "tiny" }, (b, l, n), group, penalty, top_k),
            "tokens_per_s": tokens_per_s, "ms_total": total * 1e3, "ms_prefill": prefill * 1e3,
            "ms_decode_step": step * 1e3, "ms_floor_step": floor_step * 1e3,
            "floor_tokens_per_s": b as f64 / floor_step,
        })
    );
    Ok(())
}

/// The table's key, as the peer writes it: GPT-2's rows keep their first runs' label.
fn shape_label(
    model: &str,
    (b, l, n): (usize, usize, usize),
    group: usize,
    penalty: f64,
    top_k: usize,
) -> String {
    let mut label = format!("B{b} L{l} N{n}");
    if group > 1 {
        label += &format!(" G{group}");
    }
    if penalty != 1.0 {
        label += &format!(" pen{penalty}");
    }
    if top_k > 0 {
        label += &format!(" topk{top_k}");
    }
    match model {
        "gpt2" => label,
        m => format!("{m} {label}"),
    }
}

/// The run's name in the results: `temper` for the default, else `ours-` and what differs:
/// the decode step without its graph, and each switch the run's launches show.
fn impl_label(decode: DecodeMode) -> String {
    let mode = match decode {
        DecodeMode::Fixed => Some("fixed-shapes"),
        DecodeMode::Dynamic => Some("dynamic-shapes"),
        DecodeMode::Graph => None,
    };
    let switched: Vec<&str> = mode
        .into_iter()
        .chain(
            [
                (decode_gemm_ours(), "decode-gemm"),
                (gemm_timed(), "gemm-timed"),
                (pdl_on(), "pdl"),
            ]
            .into_iter()
            .filter_map(|(on, tag)| on.then_some(tag)),
        )
        .collect();
    match switched.is_empty() {
        true => "temper".into(),
        false => format!("ours-{}", switched.join("-")),
    }
}

/// Whether our decode step's kernels launched programmatically (`TEMPER_PDL=on` on sm_90 or
/// later): asked after the run, of the launches themselves.
fn pdl_on() -> bool {
    #[cfg(feature = "cuda")]
    {
        temper::kernels::cuda::pdl::launches() > 0
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Whether generation's few-row GEMMs were ours (`TEMPER_DECODE_GEMM=ours`), not cuBLASLt's:
/// asked after the run, of the launches themselves (where our kernel does not take a product,
/// cuBLASLt serves it without a word).
fn decode_gemm_ours() -> bool {
    #[cfg(feature = "cuda")]
    {
        temper::kernels::cuda::decode_gemm::launches() > 0
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Whether cuBLASLt's candidates are timed (`TEMPER_GEMM_TUNE=timed`): the run is then an
/// ablation, not temper's default.
fn gemm_timed() -> bool {
    #[cfg(feature = "cuda")]
    {
        use temper::kernels::cuda::GemmTune;
        GemmTune::current() == GemmTune::Timed
    }
    #[cfg(not(feature = "cuda"))]
    false
}
