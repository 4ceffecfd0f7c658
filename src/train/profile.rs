//! `--profile N`: where a training step's time goes, by region, without ncu. Each region of
//! the timed steps is bracketed by two CUDA events on the compute stream (on a GPU: device
//! time, no host synchronisation inside the step) or by the host clock (on a CPU). The table
//! is printed at the end of the run and written to `profile.json` in the run directory.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

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

/// A point in time on the stream (GPU) or the host clock (CPU).
pub enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Cuda(
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
        Instant,
    ),
}

impl Mark {
    fn host(&self) -> Instant {
        match self {
            Mark::Host(t) => *t,
            #[cfg(feature = "cuda")]
            Mark::Cuda(_, t) => *t,
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

pub struct Profiler {
    device: Device,
    spans: Vec<(Region, Mark, Mark)>,
    steps: usize,
}

impl Profiler {
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            spans: vec![],
            steps: 0,
        }
    }

    pub fn mark(&self) -> Result<Mark> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &self.device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let e = d
                .cuda_stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| anyhow::anyhow!("profile: recording a CUDA event: {e:?}"))?;
            return Ok(Mark::Cuda(e, Instant::now()));
        }
        let _ = &self.device;
        Ok(Mark::Host(Instant::now()))
    }

    /// Records that `region` ran from `start` to now.
    pub fn span(&mut self, region: Region, start: Mark) -> Result<()> {
        let end = self.mark()?;
        self.spans.push((region, start, end));
        Ok(())
    }

    pub fn step_done(&mut self) {
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
            dev[i] += match (a, b) {
                #[cfg(feature = "cuda")]
                (Mark::Cuda(ea, _), Mark::Cuda(eb, _)) => f64::from(
                    ea.elapsed_ms(eb)
                        .map_err(|e| anyhow::anyhow!("profile: reading CUDA events: {e:?}"))?,
                ),
                _ => (b.host() - a.host()).as_secs_f64() * 1e3,
            };
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
        Ok(out)
    }

    /// Writes `profile.json` (the rows, steps and tokens per step) into `run_dir`.
    pub fn write(&self, run_dir: &Path, tokens_per_step: f64) -> Result<()> {
        let v = serde_json::json!({
            "steps": self.steps,
            "warmup_steps": WARMUP_STEPS,
            "device": crate::device::describe(&self.device),
            "tokens_per_step": tokens_per_step,
            "regions": self.report()?,
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
    }
}
