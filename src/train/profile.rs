//! `--profile N`: where a training step's time goes, by region and by kernel op, without ncu.
//! Each region of the timed steps, and each of our kernel ops' forward and backward inside
//! them (`kernels::spans`), is bracketed by two CUDA events on the compute stream (on a GPU:
//! device time, no host synchronisation inside the step) or by the host clock (on a CPU).
//! What the ops do not cover is everything else: candle's own ops (the references, residual
//! adds, casts, copies) and autograd's bookkeeping. The shape of the autograd graph is
//! reported beside them ([`GraphStats`]): its nodes, the activations they hold and the bytes
//! the backward zero-fills. The tables are printed at the end of the run and written to
//! `profile.json` in the run directory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Storage, Tensor};

pub use crate::kernels::spans::Mark;
use crate::kernels::spans::{self, OpSpan, Pass};
use crate::kernels::KernelOp;

/// Steps run before timing starts: the first steps allocate, load kernels and tune cuBLAS.
pub const WARMUP_STEPS: usize = 2;

/// A part of the training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Region {
    /// The task's micro-batch: data, forward pass and loss (and an RL stage's rollout when
    /// one is due: generation, scoring, advantages).
    Forward,
    Backward,
    /// Averaging the gradients over data-parallel ranks.
    GradSync,
    /// The global gradient norm, clipping and AdamW.
    Optimizer,
    /// ZeRO-1: weights broadcast from the ranks that own them.
    WeightSync,
}

impl Region {
    pub const ALL: [Region; 5] = [
        Region::Forward,
        Region::Backward,
        Region::GradSync,
        Region::Optimizer,
        Region::WeightSync,
    ];

    fn name(self) -> &'static str {
        match self {
            Region::Forward => "forward (+ data, rollout)",
            Region::Backward => "backward",
            Region::GradSync => "gradient all-reduce",
            Region::Optimizer => "grad norm, clip, AdamW",
            Region::WeightSync => "weight broadcast (ZeRO-1)",
        }
    }
}

/// Per-region time of the timed steps.
#[derive(Debug, serde::Serialize)]
pub struct RegionTime {
    pub region: Region,
    /// Device time on a GPU (CUDA events), host time on a CPU.
    pub ms_per_step: f64,
    /// Host wall time: on a GPU, how long the host took to issue the region's work.
    pub host_ms_per_step: f64,
    pub share: f64,
}

/// Per-step time of one kernel op's forward or backward.
#[derive(Debug, serde::Serialize)]
pub struct OpTime {
    pub op: String,
    pub pass: &'static str,
    pub calls_per_step: f64,
    pub ms_per_step: f64,
    /// Of the whole step.
    pub share: f64,
}

/// The autograd graph of one micro-batch's loss as its backward starts. candle-core keeps
/// every node's output until the backward ends, and gives every node that is not a variable a
/// zero-filled gradient buffer into which it adds what arrives: both costs follow from the
/// graph's shape, whatever the kernels. Variables (the parameters) are counted as nodes only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GraphStats {
    pub nodes: usize,
    /// Bytes of the distinct storages behind the non-variable nodes (a view shares its
    /// source's storage and is counted once).
    pub held_bytes: u64,
    /// Bytes of the gradient buffers the backward zero-fills, then adds into: one per
    /// non-variable node, views included.
    pub zero_filled_bytes: u64,
    /// Ops the tape recorded in that forward (`crate::tape`): outside candle's graph,
    /// so in none of the figures above.
    pub tape_ops: usize,
    /// Bytes of their outputs, an upper bound on what the tape holds.
    pub tape_output_bytes: u64,
}

impl GraphStats {
    pub fn of(loss: &Tensor) -> Self {
        let nodes = loss.sorted_nodes();
        let mut storages: HashMap<usize, u64> = HashMap::new();
        let mut zero_filled_bytes = 0u64;
        for t in nodes.iter().filter(|t| !t.is_variable()) {
            let size = t.dtype().size_in_bytes() as u64;
            zero_filled_bytes += t.elem_count() as u64 * size;
            let (storage, layout) = t.storage_and_layout();
            // A storage's identity is its address; its size at least the furthest element a
            // view of it reaches.
            let key = &*storage as *const Storage as usize;
            let end = (layout.start_offset() + t.elem_count()) as u64 * size;
            let held = storages.entry(key).or_default();
            *held = (*held).max(end);
        }
        Self {
            nodes: nodes.len(),
            held_bytes: storages.values().sum(),
            zero_filled_bytes,
            ..Self::default()
        }
    }
}

pub struct Profiler {
    device: Device,
    spans: Vec<(Region, Mark, Mark)>,
    ops: Vec<OpSpan>,
    steps: usize,
    graph: Option<GraphStats>,
}

impl Profiler {
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            spans: vec![],
            ops: vec![],
            steps: 0,
            graph: None,
        }
    }

    /// The graph recorded by [`Profiler::note_graph`], if any.
    pub fn graph(&self) -> Option<GraphStats> {
        self.graph
    }

    /// Records the shape of the first timed micro-batch's graph (`loss` before its backward).
    pub fn note_graph(&mut self, loss: &Tensor) {
        if self.graph.is_none() {
            let tape = crate::tape::last_segment().unwrap_or_default();
            self.graph = Some(GraphStats {
                tape_ops: tape.ops,
                tape_output_bytes: tape.output_bytes,
                ..GraphStats::of(loss)
            });
        }
    }

    pub fn mark(&self) -> Result<Mark> {
        Ok(Mark::now(&self.device)?)
    }

    /// Starts recording the kernel ops' spans of a timed step on this thread.
    pub fn step_started(&self) {
        spans::start();
    }

    /// Records that `region` ran from `start` to now.
    pub fn span(&mut self, region: Region, start: Mark) -> Result<()> {
        let end = self.mark()?;
        self.spans.push((region, start, end));
        Ok(())
    }

    pub fn step_done(&mut self) {
        self.ops.extend(spans::take());
        self.steps += 1;
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Milliseconds per timed step of each region that ran, in step order.
    pub fn report(&self) -> Result<Vec<RegionTime>> {
        let steps = self.steps.max(1) as f64;
        let mut dev = [0f64; Region::ALL.len()];
        let mut host = [0f64; Region::ALL.len()];
        let mut seen = [false; Region::ALL.len()];
        for (region, a, b) in &self.spans {
            let i = Region::ALL.iter().position(|r| r == region).unwrap_or(0);
            seen[i] = true;
            host[i] += (b.host() - a.host()).as_secs_f64() * 1e3;
            dev[i] += a.ms_until(b)?;
        }
        let total: f64 = dev.iter().sum::<f64>().max(1e-12);
        Ok(Region::ALL
            .iter()
            .enumerate()
            .filter(|(i, _)| seen[*i])
            .map(|(i, &region)| RegionTime {
                region,
                ms_per_step: dev[i] / steps,
                host_ms_per_step: host[i] / steps,
                share: dev[i] / total,
            })
            .collect())
    }

    /// Milliseconds per timed step of each kernel op's forward and backward, largest first;
    /// shares are of `step_ms`.
    pub fn report_ops(&self, step_ms: f64) -> Result<Vec<OpTime>> {
        let steps = self.steps.max(1) as f64;
        let mut by: BTreeMap<(KernelOp, Pass), (usize, f64)> = BTreeMap::new();
        for s in &self.ops {
            let e = by.entry((s.op, s.pass)).or_default();
            e.0 += 1;
            e.1 += s.start.ms_until(&s.end)?;
        }
        let mut rows: Vec<OpTime> = by
            .into_iter()
            .map(|((op, pass), (n, ms))| OpTime {
                op: op.name().to_string(),
                pass: pass.name(),
                calls_per_step: n as f64 / steps,
                ms_per_step: ms / steps,
                share: ms / steps / step_ms.max(1e-12),
            })
            .collect();
        rows.sort_by(|a, b| b.ms_per_step.total_cmp(&a.ms_per_step));
        Ok(rows)
    }

    /// The table for the terminal.
    pub fn table(&self, tokens_per_step: f64) -> Result<String> {
        let rows = self.report()?;
        let step_ms: f64 = rows.iter().map(|r| r.ms_per_step).sum();
        let clock = match self.device.is_cuda() {
            true => "device ms (CUDA events)",
            false => "ms",
        };
        let mut out = format!(
            "profile: {} steps after {WARMUP_STEPS} warm-up; {step_ms:.2} ms/step, {:.0} tokens/s\n{:<28} {:>24} {:>10} {:>8}\n",
            self.steps,
            tokens_per_step / (step_ms / 1e3).max(1e-12),
            "region",
            clock,
            "host ms",
            "share"
        );
        for r in &rows {
            out.push_str(&format!(
                "{:<28} {:>24.3} {:>10.3} {:>7.1}%\n",
                r.region.name(),
                r.ms_per_step,
                r.host_ms_per_step,
                r.share * 100.0
            ));
        }
        let ops = self.report_ops(step_ms)?;
        if !ops.is_empty() {
            out.push_str(&format!(
                "{:<28} {:>24} {:>10} {:>8}\n",
                "kernel op (inside the above)", "ms", "calls", "share"
            ));
            for r in &ops {
                out.push_str(&format!(
                    "{:<28} {:>24.3} {:>10.0} {:>7.1}%\n",
                    format!("{} {}", r.op, r.pass),
                    r.ms_per_step,
                    r.calls_per_step,
                    r.share * 100.0
                ));
            }
            let in_ops: f64 = ops.iter().map(|r| r.ms_per_step).sum();
            let rest = (step_ms - in_ops).max(0.0);
            out.push_str(&format!(
                "{:<28} {:>24.3} {:>10} {:>7.1}%\n",
                "not in a kernel op",
                rest,
                "",
                rest / step_ms.max(1e-12) * 100.0
            ));
        }
        if let Some(g) = self.graph {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            out.push_str(&format!(
                "autograd graph of a micro-batch: {} nodes, {:.3} GiB of activations held to the end of the backward, {:.3} GiB of gradient buffers zero-filled and added into\n",
                g.nodes,
                gib(g.held_bytes),
                gib(g.zero_filled_bytes)
            ));
            if g.tape_ops > 0 {
                out.push_str(&format!(
                    "on the tape: {} ops, {:.3} GiB of outputs at most held until each op's backward\n",
                    g.tape_ops,
                    gib(g.tape_output_bytes)
                ));
            }
        }
        Ok(out)
    }

    /// Writes `profile.json` (the rows, steps and tokens per step) into `run_dir`.
    pub fn write(&self, run_dir: &Path, tokens_per_step: f64) -> Result<()> {
        let regions = self.report()?;
        let step_ms: f64 = regions.iter().map(|r| r.ms_per_step).sum();
        let v = serde_json::json!({
            "steps": self.steps,
            "warmup_steps": WARMUP_STEPS,
            "device": crate::device::describe(&self.device),
            "tokens_per_step": tokens_per_step,
            "regions": regions,
            "ops": self.report_ops(step_ms)?,
            "graph": self.graph,
        });
        crate::io::write_atomic(
            &run_dir.join("profile.json"),
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_add_up_to_the_step_and_shares_to_one() {
        let mut p = Profiler::new(&Device::Cpu);
        for _ in 0..3 {
            let a = p.mark().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(4));
            p.span(Region::Forward, a).unwrap();
            let b = p.mark().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
            p.span(Region::Optimizer, b).unwrap();
            p.step_done();
        }
        let r = p.report().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].region, Region::Forward);
        assert!(r[0].ms_per_step >= 4.0 && r[1].ms_per_step >= 2.0, "{r:?}");
        assert!(r[0].ms_per_step > r[1].ms_per_step);
        assert!((r.iter().map(|x| x.share).sum::<f64>() - 1.0).abs() < 1e-9);
        let t = p.table(1000.0).unwrap();
        assert!(t.contains("AdamW") && t.contains("3 steps"), "{t}");
        assert!(!t.contains("kernel op"), "no op ran: no op table\n{t}");
    }

    /// Nodes, the distinct storages they hold (a view counted once, the variable not at all)
    /// and one zero-filled buffer per non-variable node.
    #[test]
    fn graph_stats_count_nodes_storages_and_gradient_buffers() {
        let x = candle_core::Var::ones(1000, candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = x.as_tensor().affine(2.0, 0.0).unwrap();
        let b = a.reshape((10, 100)).unwrap();
        let c = b.exp().unwrap();
        let loss = c.sum_all().unwrap();
        let g = GraphStats::of(&loss);
        // x, a, b (a view of a), c, and sum_all's sum and squeeze (a view of the sum).
        assert_eq!(g.nodes, 6);
        assert_eq!(g.held_bytes, 4000 + 4000 + 4);
        assert_eq!(g.zero_filled_bytes, 4000 * 3 + 4 + 4);
        let mut p = Profiler::new(&Device::Cpu);
        p.note_graph(&loss);
        p.note_graph(&x.as_tensor().sum_all().unwrap());
        assert_eq!(p.graph, Some(g), "the first micro-batch's graph is kept");
        p.step_done();
        assert!(p.table(1.0).unwrap().contains("6 nodes"));
    }

    /// The ops' spans recorded during the timed steps are summed per op and pass, averaged per
    /// step, and what they leave of the step is reported as the rest.
    #[test]
    fn kernel_ops_are_timed_inside_the_step() {
        let dev = Device::Cpu;
        let mut p = Profiler::new(&dev);
        let nap = |ms| {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(())
        };
        for _ in 0..2 {
            p.step_started();
            let a = p.mark().unwrap();
            spans::timed(KernelOp::Gemm, Pass::Forward, &dev, || nap(3)).unwrap();
            spans::timed(KernelOp::Gemm, Pass::Forward, &dev, || nap(3)).unwrap();
            spans::timed(KernelOp::Bias, Pass::Backward, &dev, || nap(2)).unwrap();
            nap(4).unwrap();
            p.span(Region::Forward, a).unwrap();
            p.step_done();
        }
        // Outside a timed step nothing is recorded.
        spans::timed(KernelOp::Gelu, Pass::Forward, &dev, || nap(1)).unwrap();
        let step_ms = p.report().unwrap()[0].ms_per_step;
        let ops = p.report_ops(step_ms).unwrap();
        let names: Vec<(&str, &str, f64)> = ops
            .iter()
            .map(|o| (o.op.as_str(), o.pass, o.calls_per_step))
            .collect();
        assert_eq!(names, [("gemm", "fwd", 2.0), ("bias", "bwd", 1.0)]);
        assert!(
            ops[0].ms_per_step >= 6.0 && ops[1].ms_per_step >= 2.0,
            "{ops:?}"
        );
        assert!(ops.iter().map(|o| o.share).sum::<f64>() < 1.0);
        let t = p.table(100.0).unwrap();
        assert!(
            t.contains("gemm fwd") && t.contains("not in a kernel op"),
            "{t}"
        );
    }
}
