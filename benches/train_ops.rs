//! The GPU training step's kernel ops, each ours (the fused custom op) against its reference
//! (candle's composite), bf16 at GPT-2 124M B16 T1024 shapes (src/config/model.rs's `gpt2`:
//! R = 16384 rows, hidden 768, MLP 3072, vocabulary 50304): LayerNorm, GELU, the bias add,
//! bias + GELU, Llama's SwiGLU and RoPE (at GPT-2's widths), attention's head split, the token +
//! position embedding,
//! the loss head's log-probabilities (alone, and with the entropy the RL stages read), and one
//! AdamW step over GPT-2's 124M f32 parameters. PyTorch eager at the same shapes comes from
//! scripts/bench_peers.py (`train_ops`), run in the same device call by scripts/gpu-check.sh,
//! which divides one by the other.
//!
//! fwd: the op's output only. fwd+bwd: the forward, then the backward driven by a fixed random
//! dY, as PyTorch's `autograd.grad(y, inputs, dy)` is. Ours calls each op's backward directly
//! (`gelu::backward`, `bias::backward`, `embedding::backward`, `LayerNormDirect`,
//! `LogprobsDirect`: what candle's autograd would call, without a graph); the reference goes
//! through candle's autograd seeded through `y * dy` (candle-core 0.11's `backward` seeds a
//! non-scalar root with ones, so dL/dy = dy, at one elementwise product each way and no
//! reduction). Each JSON line says which (`"drive"`). AdamW has no backward: its fwd is one
//! optimizer step (global norm, clipping to 1.0, the update) and its fwd+bwd is null.
//!
//! GB/s (of the forward: these ops are memory-bound) counts the fewest bytes the forward must
//! read and write; e is the compute dtype's size (2), R rows, C columns:
//! - layernorm (C = hidden): x in, y out, the f32 weight and bias: 2·R·C·e + 8·C
//! - gelu (C = MLP): x in, y out: 2·R·C·e
//! - bias (C = hidden), bias_gelu (C = MLP): y in, the output out, the f32 bias: 2·R·C·e + 4·C
//! - swiglu, geglu (C = MLP): the gate and up projections in, the output out: 3·R·C·e
//! - rope (the queries `[B, heads, T, D]`): x in and out, the cos and sin tables
//!   `[B, 1, T, D/2]` in: (2·B·heads·T·D + B·T·D)·e
//! - heads (C = hidden): the `[B, T, C]` projection in, its `[B, heads, T, D]` copy out: 2·R·C·e
//! - embedding (H = hidden, T positions): the token ids, the token rows they read (f32 table),
//!   the position table once (positions follow from the row), y out: 4·R + 4·R·H + 4·T·H + e·R·H
//! - logprobs (V = vocabulary): the logits and targets in, the f32 log-probabilities out:
//!   e·R·V + 8·R; logprobs_entropy: the f32 entropies out too, e·R·V + 12·R (both sides drive
//!   it through autograd, the two outputs stacked `[2, R]`)
//! - adamw (P parameters, as temper trains with bf16 compute: every weight has a bf16 compute
//!   copy, and the matrices' gradients are the copies' bf16 ones): the gradients twice (the
//!   global norm must be complete before any update), the f32 parameters and both moments read
//!   and written, the copies written: 26·P + 2·(bytes of the gradients)
//!
//! Before timing an op, ours is checked once against the reference (the output and every
//! gradient; for AdamW the parameters and moments after one step from the same state) and the
//! largest relative difference printed as `{"bench":"check","of":"train_ops/<op>",...}`. Times
//! are medians of CUDA-event timings after warm-up; each measurement is one JSON line
//! (`{"bench":"train_ops","op":..,"shape":..,"impl":"ours"|"reference",...}`). Each op's
//! tensors are freed before the next op's are made.
//!
//! Adding an op: a function building its [`Case`] (inputs, ours, the reference) from [`Dims`],
//! and a row in [`CASES`]; its peer, a function in scripts/bench_peers.py's `train_ops`.
//!
//! Run: `cargo bench --features cuda --bench train_ops` (or the packed binary from
//! scripts/gpu-build.sh). Without feature `cuda` (or a device) it runs every case on the CPU
//! at a small GPT-2-shaped size and prints text only, no JSON: there ours is each op's CPU
//! implementation (AdamW's falls back to the reference), so the harness stays checked.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use temper::config::ModelConfig;
use temper::kernels::adamw::{self, Hyper, Slot};
use temper::kernels::bias::{self, BiasAct};
use temper::kernels::layernorm::{self, LayerNormDirect};
use temper::kernels::logprobs::{self, LogprobsDirect};
use temper::kernels::swiglu::Gate;
use temper::kernels::{embedding, gelu, heads, rope, swiglu, KernelChoice};

#[path = "common/timing.rs"]
mod timing;
use timing::median;

/// Untimed calls before timing: module loads, allocator pools.
const WARMUP: usize = 3;
/// Timed calls. The references are the slow side (the loss head's composite makes several
/// f32 copies of 16384 x 50304), so fewer: the whole bench must fit gpu-check's 90 s.
const REPS_OURS: usize = 20;
const REPS_REFERENCE: usize = 10;

/// How an implementation's backward is driven, for the JSON lines.
const DIRECT: &str = "direct";
const AUTOGRAD: &str = "autograd y*dy";

/// The ops, in the order they are run. See [`Case`] for what a row needs.
const CASES: [(&str, Build); 12] = [
    ("layernorm", layernorm),
    ("gelu", gelu),
    ("bias", bias),
    ("bias_gelu", bias_gelu),
    ("swiglu", swiglu),
    ("geglu", geglu),
    ("rope", rope),
    ("heads", heads_split),
    ("embedding", embedding),
    ("logprobs", logprobs),
    ("logprobs_entropy", logprobs_entropy),
    ("adamw", adamw),
];

/// Makes an op's [`Case`] at the given shapes.
type Build = fn(&Dims) -> Result<Case>;

/// One call of an implementation; it returns what it computed (for the check; dropped when
/// timed).
type Run = Box<dyn FnMut() -> Result<Vec<Tensor>>>;

struct Impl {
    /// The forward alone (for AdamW, one optimizer step).
    fwd: Run,
    /// The forward, then the backward from the case's dY: `[y, each gradient]`. None for an op
    /// without a backward.
    fwd_bwd: Option<Run>,
    drive: Option<&'static str>,
}

impl Impl {
    fn new(fwd: Run, fwd_bwd: Run, drive: &'static str) -> Self {
        Self {
            fwd,
            fwd_bwd: Some(fwd_bwd),
            drive: Some(drive),
        }
    }
}

/// One op at one shape: its inputs live in the closures of `ours` and `reference`.
struct Case {
    shape: String,
    /// The fewest bytes the forward reads and writes (formulas in the header).
    fwd_bytes: f64,
    /// What the check compares, in the order of the outputs.
    compares: &'static str,
    ours: Impl,
    reference: Impl,
}

/// The model's widths and the batch that shape the cases.
struct Dims {
    dev: Device,
    cfg: ModelConfig,
    batch: usize,
    seq: usize,
    dtype: DType,
}

impl Dims {
    /// On a GPU GPT-2 124M (the `gpt2` preset), 16 sequences of its 1024-token context; on the
    /// CPU a small model of its kind. bf16 either way.
    fn for_device(dev: Device) -> anyhow::Result<Self> {
        let gpt2 = ModelConfig::preset("gpt2")?;
        let (cfg, batch) = match dev.is_cuda() {
            true => (gpt2, 16),
            false => (
                ModelConfig {
                    vocab_size: 1000,
                    hidden_size: 64,
                    intermediate_size: 256,
                    num_hidden_layers: 2,
                    num_attention_heads: 4,
                    num_key_value_heads: 4,
                    max_position_embeddings: 64,
                    ..gpt2
                },
                4,
            ),
        };
        Ok(Self {
            dev,
            seq: cfg.max_position_embeddings,
            cfg,
            batch,
            dtype: DType::BF16,
        })
    }

    fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Bytes of one element of the compute dtype.
    fn elem(&self) -> usize {
        self.dtype.size_in_bytes()
    }

    /// f32 normal values.
    fn randn(&self, shape: &[usize], mean: f32, std: f32) -> Result<Tensor> {
        Tensor::randn(mean, std, shape, &self.dev)
    }

    /// A standard normal activation in the compute dtype.
    fn act(&self, shape: &[usize]) -> Result<Tensor> {
        self.randn(shape, 0.0, 1.0)?.to_dtype(self.dtype)
    }

    /// `n` ids below `below`, spread as a hash spreads them (repeats included, as in text), on
    /// the device.
    fn ids(&self, n: usize, below: usize) -> Result<Tensor> {
        let ids: Vec<u32> = (0..n as u64)
            .map(|i| ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % below as u64) as u32)
            .collect();
        Tensor::from_vec(ids, n, &self.dev)
    }
}

/// An implementation's call of one output.
fn call(f: impl Fn() -> Result<Tensor> + 'static) -> Run {
    Box::new(move || Ok(vec![f()?]))
}

/// `f` over `inputs` (copied into fresh variables) through candle's autograd, seeded through
/// `y * dy`: `[y, the gradient of each input]`.
fn autograd(
    inputs: &[&Tensor],
    dy: &Tensor,
    f: impl Fn(&[Tensor]) -> Result<Tensor> + 'static,
) -> Result<Run> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(t))
        .collect::<Result<Vec<_>>>()?;
    let dy = dy.clone();
    Ok(Box::new(move || {
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&xs)?;
        // backward() seeds a non-scalar root with ones: dL/dy = dy.
        let grads = (&y * &dy)?.backward()?;
        let mut out = vec![y];
        for v in &vars {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("autograd gave no gradient".into()))?;
            out.push(g.clone());
        }
        Ok(out)
    }))
}

/// LayerNorm over the hidden width (GPT-2's ln_1, ln_2, ln_f).
fn layernorm(d: &Dims) -> Result<Case> {
    let (r, c, eps) = (d.rows(), d.cfg.hidden_size, 1e-5);
    let x = d.act(&[r, c])?;
    let w = d.randn(&[c], 1.0, 0.1)?;
    let b = d.randn(&[c], 0.0, 0.1)?;
    let dy = d.act(&[r, c])?;
    let direct = LayerNormDirect::new(&x, &w, &b, eps)?;
    let ours_fwd = {
        let (x, w, b) = (x.clone(), w.clone(), b.clone());
        call(move || layernorm::fused(&x, &w, &b, eps))
    };
    let ours_both: Run = {
        let dy = dy.clone();
        Box::new(move || {
            let y = direct.forward()?;
            let (dx, dw, db) = direct.backward(&y, &dy)?;
            Ok(vec![y, dx, dw, db])
        })
    };
    let ref_both = autograd(&[&x, &w, &b], &dy, move |v| {
        layernorm::reference(&v[0], &v[1], &v[2], eps)
    })?;
    Ok(Case {
        shape: format!("{r}x{c}"),
        fwd_bytes: (2 * r * c * d.elem() + 8 * c) as f64,
        compares: "y, dx, dw, db",
        ours: Impl::new(ours_fwd, ours_both, DIRECT),
        reference: Impl::new(
            call(move || layernorm::reference(&x, &w, &b, eps)),
            ref_both,
            AUTOGRAD,
        ),
    })
}

/// GELU (tanh) over the MLP's activation, on its own (where no bias precedes it).
fn gelu(d: &Dims) -> Result<Case> {
    let (r, c) = (d.rows(), d.cfg.intermediate_size);
    let x = d.act(&[r, c])?;
    let dy = d.act(&[r, c])?;
    let ours_fwd = {
        let x = x.clone();
        call(move || gelu::fused(&x))
    };
    let ours_both: Run = {
        let (x, dy) = (x.clone(), dy.clone());
        Box::new(move || {
            let y = gelu::fused(&x)?;
            let dx = gelu::backward(&x, &dy)?;
            Ok(vec![y, dx])
        })
    };
    let ref_both = autograd(&[&x], &dy, |v| gelu::reference(&v[0]))?;
    Ok(Case {
        shape: format!("{r}x{c}"),
        fwd_bytes: (2 * r * c * d.elem()) as f64,
        compares: "y, dx",
        ours: Impl::new(ours_fwd, ours_both, DIRECT),
        reference: Impl::new(call(move || gelu::reference(&x)), ref_both, AUTOGRAD),
    })
}

/// A linear layer's f32 bias after its GEMM, `act(y + b)`, over `cols` columns.
fn bias_case(d: &Dims, cols: usize, act: BiasAct, compares: &'static str) -> Result<Case> {
    let r = d.rows();
    let y = d.act(&[r, cols])?;
    let b = d.randn(&[cols], 0.0, 0.1)?;
    let dy = d.act(&[r, cols])?;
    let ours_fwd = {
        let (y, b) = (y.clone(), b.clone());
        call(move || bias::fused(&y, &b, act))
    };
    let ours_both: Run = {
        let (y, b, dy) = (y.clone(), b.clone(), dy.clone());
        Box::new(move || {
            let out = bias::fused(&y, &b, act)?;
            let (dyin, db) = bias::backward(&y, &b, &dy, act)?;
            Ok(vec![out, dyin, db])
        })
    };
    let ref_both = autograd(&[&y, &b], &dy, move |v| bias::reference(&v[0], &v[1], act))?;
    Ok(Case {
        shape: format!("{r}x{cols}"),
        fwd_bytes: (2 * r * cols * d.elem() + 4 * cols) as f64,
        compares,
        ours: Impl::new(ours_fwd, ours_both, DIRECT),
        reference: Impl::new(
            call(move || bias::reference(&y, &b, act)),
            ref_both,
            AUTOGRAD,
        ),
    })
}

/// The bias of the projections back to the hidden width (attention's and the MLP's).
fn bias(d: &Dims) -> Result<Case> {
    bias_case(d, d.cfg.hidden_size, BiasAct::Identity, "out, dy, db")
}

/// The MLP's first bias with GPT-2's GELU after it, fused.
fn bias_gelu(d: &Dims) -> Result<Case> {
    bias_case(d, d.cfg.intermediate_size, BiasAct::GeluTanh, "out, dy, db")
}

/// Llama's gating `silu(g) * u`, at GPT-2's rows and MLP width.
fn swiglu(d: &Dims) -> Result<Case> {
    gated(d, Gate::Silu)
}

/// Gemma's gating `gelu_tanh(g) * u`, at the same shapes.
fn geglu(d: &Dims) -> Result<Case> {
    gated(d, Gate::GeluTanh)
}

fn gated(d: &Dims, gate: Gate) -> Result<Case> {
    let (r, c) = (d.rows(), d.cfg.intermediate_size);
    let (g, u, dy) = (d.act(&[r, c])?, d.act(&[r, c])?, d.act(&[r, c])?);
    let ours_fwd = {
        let (g, u) = (g.clone(), u.clone());
        call(move || swiglu::fused_gate(&g, &u, gate))
    };
    let ours_both: Run = {
        let (g, u, dy) = (g.clone(), u.clone(), dy.clone());
        Box::new(move || {
            let y = swiglu::fused_gate(&g, &u, gate)?;
            let (dg, du) = swiglu::backward_gate(&g, &u, &dy, gate)?;
            Ok(vec![y, dg, du])
        })
    };
    let reference = move |g: &Tensor, u: &Tensor| match gate {
        Gate::Silu => swiglu::reference(g, u),
        Gate::GeluTanh => swiglu::geglu_reference(g, u),
    };
    let ref_both = autograd(&[&g, &u], &dy, move |v| reference(&v[0], &v[1]))?;
    Ok(Case {
        shape: format!("{r}x{c}"),
        fwd_bytes: (3 * r * c * d.elem()) as f64,
        compares: "y, dg, du",
        ours: Impl::new(ours_fwd, ours_both, DIRECT),
        reference: Impl::new(call(move || reference(&g, &u)), ref_both, AUTOGRAD),
    })
}

/// The queries' projection `[B, T, hidden]` into heads `[B, heads, T, head_dim]`; the
/// backward is the inverse permutation of dY (`heads::fused` the other way).
fn heads_split(d: &Dims) -> Result<Case> {
    let (b, t, c) = (d.batch, d.seq, d.cfg.hidden_size);
    let (h, hd) = (d.cfg.num_attention_heads, d.cfg.head_dim());
    let x = d.act(&[b, t, c])?;
    let dy = d.act(&[b, h, t, hd])?;
    let ours_fwd = {
        let x = x.clone();
        call(move || heads::fused(&x, (b, t, h, hd), false))
    };
    let ours_both: Run = {
        let (x, dy) = (x.clone(), dy.clone());
        Box::new(move || {
            let y = heads::fused(&x, (b, t, h, hd), false)?;
            let dx = heads::fused(&dy, (b, h, t, hd), true)?;
            Ok(vec![y, dx])
        })
    };
    let ref_both = autograd(&[&x], &dy, move |v| heads::split_reference(&v[0], h))?;
    Ok(Case {
        shape: format!("B{b} T{t} H{h} D{hd}"),
        fwd_bytes: (2 * b * t * c * d.elem()) as f64,
        compares: "y, dx",
        ours: Impl::new(ours_fwd, ours_both, DIRECT),
        reference: Impl::new(
            call(move || heads::split_reference(&x, h)),
            ref_both,
            AUTOGRAD,
        ),
    })
}

/// Rotary embeddings of the queries `[B, heads, T, head_dim]` at GPT-2's sizes, with tables
/// `[B, 1, T, head_dim / 2]` in the compute dtype as `src/model/rope.rs` makes them.
fn rope(d: &Dims) -> Result<Case> {
    let (b, t) = (d.batch, d.seq);
    let (h, hd) = (d.cfg.num_attention_heads, d.cfg.head_dim());
    let x = d.act(&[b, h, t, hd])?;
    let dy = d.act(&[b, h, t, hd])?;
    let cos = d.act(&[b, 1, t, hd / 2])?;
    let sin = d.act(&[b, 1, t, hd / 2])?;
    let ours_fwd = {
        let (x, cos, sin) = (x.clone(), cos.clone(), sin.clone());
        call(move || rope::fused(&x, &cos, &sin))
    };
    let ours_both: Run = {
        let (x, cos, sin, dy) = (x.clone(), cos.clone(), sin.clone(), dy.clone());
        Box::new(move || {
            let y = rope::fused(&x, &cos, &sin)?;
            let dx = rope::backward(&dy, &cos, &sin)?;
            Ok(vec![y, dx])
        })
    };
    let ref_both = {
        let (cos, sin) = (cos.clone(), sin.clone());
        autograd(&[&x], &dy, move |v| rope::reference(&v[0], &cos, &sin))?
    };
    Ok(Case {
        shape: format!("B{b} H{h} T{t} D{hd}"),
        fwd_bytes: ((2 * b * h * t * hd + b * t * hd) * d.elem()) as f64,
        compares: "y, dx",
        ours: Impl::new(ours_fwd, ours_both, DIRECT),
        reference: Impl::new(
            call(move || rope::reference(&x, &cos, &sin)),
            ref_both,
            AUTOGRAD,
        ),
    })
}

/// Token plus learned position embeddings, as src/model/transformer.rs adds them: two
/// lookups of f32 tables into the compute dtype, and their sum.
fn embedding(d: &Dims) -> Result<Case> {
    let (r, h, v, t, dt) = (
        d.rows(),
        d.cfg.hidden_size,
        d.cfg.vocab_size,
        d.seq,
        d.dtype,
    );
    let wte = d.randn(&[v, h], 0.0, 0.02)?;
    let wpe = d.randn(&[t, h], 0.0, 0.01)?;
    let ids = d.ids(r, v)?;
    let pos: Vec<u32> = (0..r).map(|i| (i % t) as u32).collect();
    let pos = Tensor::from_vec(pos, r, &d.dev)?;
    let dy = d.act(&[r, h])?;
    let ours_fwd = {
        let (wte, wpe, ids, pos) = (wte.clone(), wpe.clone(), ids.clone(), pos.clone());
        call(move || embedding::fused2(&wte, &ids, &wpe, &pos, dt))
    };
    let ours_both: Run = {
        let (wte, wpe, ids, pos) = (wte.clone(), wpe.clone(), ids.clone(), pos.clone());
        let dy = dy.clone();
        // The training step's tape holds the ids on the host by its backward (their copy starts
        // at the forward): the backward groups them by row on the host and runs the kernel,
        // with no wait for the device. `embedding::backward` adds that wait and the copy (the
        // row's 2.06 ms on the H200, 2026-12-04, timed them, against the 0.22 ms of device time
        // the step's profile gave the lookup's backward); the grouping is timed either way.
        let (ids_host, pos_host) = (ids.to_vec1::<u32>()?, pos.to_vec1::<u32>()?);
        Box::new(move || {
            let y = embedding::fused2(&wte, &ids, &wpe, &pos, dt)?;
            // Each table's gradient sums dY's rows by its own ids.
            let dwte = embedding::backward_from_host(&dy, &ids_host, v)?;
            let dwpe = embedding::backward_from_host(&dy, &pos_host, t)?;
            Ok(vec![y, dwte, dwpe])
        })
    };
    let ref_both = {
        let (ids, pos) = (ids.clone(), pos.clone());
        autograd(&[&wte, &wpe], &dy, move |x| {
            embedding::reference(&x[0], &ids, dt)? + embedding::reference(&x[1], &pos, dt)?
        })?
    };
    Ok(Case {
        shape: format!("B{} T{t} V{v} H{h}", d.batch),
        fwd_bytes: (4 * r + 4 * r * h + 4 * t * h + d.elem() * r * h) as f64,
        compares: "y, dwte, dwpe",
        ours: Impl::new(ours_fwd, ours_both, DIRECT),
        reference: Impl::new(
            call(move || {
                embedding::reference(&wte, &ids, dt)? + embedding::reference(&wpe, &pos, dt)?
            }),
            ref_both,
            AUTOGRAD,
        ),
    })
}

/// The loss head: the targets' f32 log-probabilities from logits in the compute dtype, and
/// the logits' gradient (cross-entropy is their masked mean).
fn logprobs(d: &Dims) -> Result<Case> {
    let (r, v) = (d.rows(), d.cfg.vocab_size);
    let logits = d.act(&[r, v])?;
    let targets = d.ids(r, v)?;
    let dy = d.randn(&[r], 0.0, 1.0)?;
    let direct = LogprobsDirect::new(&logits, &targets)?;
    let ours_fwd = {
        let (logits, targets) = (logits.clone(), targets.clone());
        call(move || logprobs::fused(&logits, &targets))
    };
    let ours_both: Run = {
        let dy = dy.clone();
        Box::new(move || {
            let lp = direct.forward()?;
            let dx = direct.backward(&lp, &dy)?;
            Ok(vec![lp, dx])
        })
    };
    let ref_both = {
        let targets = targets.clone();
        autograd(&[&logits], &dy, move |x| {
            logprobs::reference(&x[0], &targets)
        })?
    };
    Ok(Case {
        shape: format!("{r}x{v}"),
        fwd_bytes: (d.elem() * r * v + 8 * r) as f64,
        compares: "logp, dlogits",
        ours: Impl::new(ours_fwd, ours_both, DIRECT),
        reference: Impl::new(
            call(move || logprobs::reference(&logits, &targets)),
            ref_both,
            AUTOGRAD,
        ),
    })
}

/// The loss head with the softmax's entropy (PPO's every minibatch, GRPO's entropy knobs):
/// `[2, R]`, the log-probabilities over the entropies, and the logits' gradient of both.
fn logprobs_entropy(d: &Dims) -> Result<Case> {
    let (r, v) = (d.rows(), d.cfg.vocab_size);
    let logits = d.act(&[r, v])?;
    let targets = d.ids(r, v)?;
    let dy = d.randn(&[2, r], 0.0, 1.0)?;
    let ours = {
        let targets = targets.clone();
        move |x: &Tensor| -> Result<Tensor> {
            let (lp, h) = logprobs::fused_entropy(x, &targets)?;
            Tensor::stack(&[lp, h], 0)
        }
    };
    let reference = {
        let targets = targets.clone();
        move |x: &Tensor| -> Result<Tensor> {
            let lp = logprobs::reference(x, &targets)?;
            Tensor::stack(&[lp, logprobs::reference_entropy(x)?], 0)
        }
    };
    let (o, rf) = (ours.clone(), reference.clone());
    let ours_both = autograd(&[&logits], &dy, move |x| o(&x[0]))?;
    let ref_both = autograd(&[&logits], &dy, move |x| rf(&x[0]))?;
    let (l1, l2) = (logits.clone(), logits);
    Ok(Case {
        shape: format!("{r}x{v}"),
        fwd_bytes: (d.elem() * r * v + 12 * r) as f64,
        compares: "[logp; entropy], dlogits",
        ours: Impl::new(call(move || ours(&l1)), ours_both, AUTOGRAD),
        reference: Impl::new(call(move || reference(&l2)), ref_both, AUTOGRAD),
    })
}

/// GPT-2's parameters as temper's model holds them (src/model: the token and position
/// embeddings, the head tied to the first; per layer two LayerNorms, the q, k, v and output
/// projections and the MLP's two, each with its bias; the final LayerNorm), each with whether
/// it takes weight decay (matrices do; gains, biases and embeddings do not, as
/// src/train/params.rs says).
fn gpt2_params(cfg: &ModelConfig) -> Vec<(Vec<usize>, bool)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (aw, kv) = (cfg.attn_width(), cfg.num_key_value_heads * cfg.head_dim());
    let norm = [(vec![h], false), (vec![h], false)];
    let mut p = vec![
        (vec![cfg.vocab_size, h], false),
        (vec![cfg.max_position_embeddings, h], false),
    ];
    for _ in 0..cfg.num_hidden_layers {
        p.extend(norm.clone());
        for (out, inp) in [(aw, h), (kv, h), (kv, h), (h, aw)] {
            p.extend([(vec![out, inp], true), (vec![out], false)]);
        }
        p.extend(norm.clone());
        p.extend([
            (vec![i, h], true),
            (vec![i], false),
            (vec![h, i], true),
            (vec![h], false),
        ]);
    }
    p.extend(norm);
    p
}

/// One AdamW step over GPT-2's parameters: the global gradient norm, clipping to 1.0 and the
/// update, with bf16 compute copies (what temper's optimizer runs once per step).
fn adamw(d: &Dims) -> Result<Case> {
    let shapes = gpt2_params(&d.cfg);
    let n: usize = shapes
        .iter()
        .map(|(s, _)| s.iter().product::<usize>())
        .sum();
    if n as u128 != d.cfg.num_params() {
        candle_core::bail!(
            "train_ops: the bench's GPT-2 parameter list ({n}) no longer matches \
             ModelConfig::num_params ({})",
            d.cfg.num_params()
        );
    }
    let init = shapes
        .iter()
        .map(|(s, _)| d.randn(s, 0.0, 0.02))
        .collect::<Result<Vec<_>>>()?;
    // A matrix's gradient is its compute copy's, in bf16; a vector's (bias, norm gain) comes
    // from an op that reads the f32 master.
    let grads = shapes
        .iter()
        .map(|(s, _)| {
            let g = d.randn(s, 0.0, 1e-3)?;
            match s.len() {
                2 => g.to_dtype(DType::BF16),
                _ => Ok(g),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let grad_bytes: usize = grads
        .iter()
        .map(|g| g.elem_count() * g.dtype().size_in_bytes())
        .sum();
    let decay: Vec<bool> = shapes.iter().map(|(_, wd)| *wd).collect();
    let step = |choice: KernelChoice| -> Result<Run> {
        // Each side its own weights and moments: the kernel updates them in place.
        let params = init
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let copies = init
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::BF16)?))
            .collect::<Result<Vec<_>>>()?;
        let mut ms = init
            .iter()
            .map(|t| t.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let mut vs = ms
            .iter()
            .map(|t| t.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let (grads, decay) = (grads.clone(), decay.clone());
        let h = Hyper {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            t: 1,
            max_norm: 1.0,
        };
        Ok(Box::new(move || {
            let mut slots: Vec<Slot> = params
                .iter()
                .zip(ms.iter_mut().zip(vs.iter_mut()))
                .zip(grads.iter().zip(&decay).zip(&copies))
                .map(|((param, (m, v)), ((grad, &wd), copy))| Slot {
                    param,
                    m,
                    v,
                    grad,
                    copy: Some(copy),
                    lr: 6e-4,
                    weight_decay: if wd { 0.1 } else { 0.0 },
                })
                .collect();
            adamw::update(&grads, &mut slots, &h, choice)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
            drop(slots);
            Ok(params
                .iter()
                .map(|p| p.as_tensor().clone())
                .chain(ms.iter().cloned())
                .chain(vs.iter().cloned())
                .chain(copies.iter().map(|c| c.as_tensor().clone()))
                .collect())
        }))
    };
    let one_step = |choice| -> Result<Impl> {
        Ok(Impl {
            fwd: step(choice)?,
            fwd_bwd: None,
            drive: None,
        })
    };
    Ok(Case {
        shape: format!("{n} params"),
        fwd_bytes: (26 * n + 2 * grad_bytes) as f64,
        compares: "parameters, m, v and compute copies after one step",
        ours: one_step(KernelChoice::Custom)?,
        reference: one_step(KernelChoice::Reference)?,
    })
}

/// Median milliseconds of `f` after [`WARMUP`] calls: CUDA events on a GPU, the wall clock on
/// the CPU.
fn time_ms(dev: &Device, reps: usize, f: &mut Run) -> Result<f64> {
    if dev.is_cuda() {
        #[cfg(feature = "cuda")]
        return timing::cuda_time_ms(dev, WARMUP, reps, || f().map(|_| ()));
    }
    for _ in 0..WARMUP {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// The largest absolute value, in f32. Row maxima first: candle reduces a whole tensor in
/// one block, which takes long over 16384 x 50304.
fn max_abs(t: &Tensor) -> Result<f32> {
    let mut t = t.to_dtype(DType::F32)?.abs()?;
    if t.rank() > 1 {
        t = t.max(D::Minus1)?;
    }
    t.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Ours against the reference once: the largest `max |a - b| / max |b|` over the outputs.
fn check(op: &str, case: &mut Case, json: bool) -> Result<()> {
    let (ours, refs) = match (case.ours.fwd_bwd.as_mut(), case.reference.fwd_bwd.as_mut()) {
        (Some(o), Some(r)) => (o()?, r()?),
        _ => ((case.ours.fwd)()?, (case.reference.fwd)()?),
    };
    if ours.len() != refs.len() {
        candle_core::bail!(
            "train_ops/{op}: {} outputs against {}",
            ours.len(),
            refs.len()
        );
    }
    let mut worst = 0f64;
    for (a, b) in ours.iter().zip(&refs) {
        let diff = max_abs(&(a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?)?;
        worst = worst.max((diff / max_abs(b)?.max(1e-30)) as f64);
    }
    let what = format!("{} vs reference", case.compares);
    if json {
        let line = serde_json::json!({"bench": "check", "of": format!("train_ops/{op}"),
            "shape": case.shape, "impl": "ours", "what": what, "max_rel_diff": worst});
        println!("{line}");
    } else {
        println!(
            "check {op} {}: {what}: max relative difference {worst:.3e}",
            case.shape
        );
    }
    Ok(())
}

fn run(d: &Dims, json: bool) -> anyhow::Result<()> {
    println!(
        "train_ops, {:?} (medians after {WARMUP} warm-up calls; peer: scripts/bench_peers.py \
         train_ops)",
        d.dtype
    );
    println!(
        "{:<10} {:<22} {:<10} {:>9} {:>7} {:>12}",
        "op", "shape", "impl", "fwd ms", "GB/s", "fwd+bwd ms"
    );
    for (op, build) in CASES {
        // Built here and dropped at the end of the iteration: one op's tensors at a time.
        let mut case = build(d)?;
        check(op, &mut case, json)?;
        for (name, imp, reps) in [
            ("ours", &mut case.ours, REPS_OURS),
            ("reference", &mut case.reference, REPS_REFERENCE),
        ] {
            let fwd = time_ms(&d.dev, reps, &mut imp.fwd)?;
            let both = match imp.fwd_bwd.as_mut() {
                Some(f) => Some(time_ms(&d.dev, reps, f)?),
                None => None,
            };
            let gbps = case.fwd_bytes / fwd / 1e6;
            let both_s = both.map_or_else(|| "-".to_string(), |b| format!("{b:.4}"));
            println!(
                "{op:<10} {:<22} {name:<10} {fwd:>9.4} {gbps:>7.0} {both_s:>12}",
                case.shape
            );
            if json {
                let line = serde_json::json!({"bench": "train_ops", "op": op, "shape": case.shape,
                    "impl": name, "drive": imp.drive, "fwd_ms": fwd, "fwd_bwd_ms": both,
                    "gbps": gbps});
                println!("{line}");
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let dims = Dims::for_device(device()?)?;
    let on_gpu = dims.dev.is_cuda();
    if !on_gpu {
        println!(
            "train_ops bench: no CUDA kernel here (feature `cuda` and a GPU); every op on the \
             CPU at a small size, ours being its CPU implementation (AdamW's: the reference)"
        );
    }
    // JSON lines only for GPU figures: nothing from a CPU run can be taken for one.
    run(&dims, on_gpu)
}

fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    if temper::kernels::cuda::cuda_available() {
        return Device::new_cuda(0);
    }
    Ok(Device::Cpu)
}
