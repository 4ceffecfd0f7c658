//! Linear warmup, then a decay (`[train] lr_scheduler`: cosine, linear or none) to
//! `min_lr_ratio * lr` at the run's end: step `steps`, one past the last trained, as
//! transformers' schedulers reach theirs.

use crate::config::{LrScheduler, TrainConfig};

/// The steps the learning rate warms up over: `warmup_ratio` of the run where it is set, else
/// `warmup_steps`; short of the whole run.
fn warmup(cfg: &TrainConfig) -> usize {
    let asked = match cfg.warmup_ratio {
        Some(r) => (r * cfg.steps as f64).ceil() as usize,
        None => cfg.warmup_steps,
    };
    asked.min(cfg.steps.saturating_sub(1))
}

/// What to say where a `warmup_steps` the user chose is longer than the run and so cut to
/// `warmup`: the file and line that chose it, the value and what the schedule becomes.
pub fn warmup_cut(cfg: &TrainConfig) -> Option<String> {
    let (file, chosen) = cfg.warmup_steps_from.as_ref()?;
    if *chosen != cfg.warmup_steps || cfg.warmup_steps <= cfg.steps || cfg.warmup_ratio.is_some() {
        return None;
    }
    Some(format!(
        "{}: train.warmup_steps = {} is more than the run's {} steps: the learning rate warms \
         up over its first {} and does not decay",
        crate::config::locate(file, "train.warmup_steps"),
        cfg.warmup_steps,
        cfg.steps,
        warmup(cfg)
    ))
}

pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    let warm = warmup(cfg);
    if step < warm {
        return cfg.lr * (step + 1) as f64 / warm as f64;
    }
    let span = (cfg.steps - warm).max(1) as f64;
    let progress = ((step - warm) as f64 / span).min(1.0);
    let min = cfg.lr * cfg.min_lr_ratio;
    let left = match cfg.lr_scheduler {
        LrScheduler::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        LrScheduler::Linear => 1.0 - progress,
        LrScheduler::Constant => return cfg.lr,
    };
    min + (cfg.lr - min) * left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let cfg = TrainConfig {
            steps: 110,
            warmup_steps: 10,
            lr: 1.0,
            min_lr_ratio: 0.1,
            ..TrainConfig::default()
        };
        assert!((lr_at(&cfg, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(&cfg, 9) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 60) - 0.55).abs() < 1e-12);
        assert!((lr_at(&cfg, 110) - 0.1).abs() < 1e-12);
        assert!((1..110).all(|s| s <= 10 || lr_at(&cfg, s) <= lr_at(&cfg, s - 1)));
    }

    #[test]
    fn linear_and_constant_after_a_warmup_of_a_share_of_the_run() {
        let mut cfg = TrainConfig {
            steps: 100,
            warmup_steps: 50,
            warmup_ratio: Some(0.1),
            lr: 1.0,
            min_lr_ratio: 0.0,
            lr_scheduler: LrScheduler::Linear,
            ..TrainConfig::default()
        };
        assert_eq!(warmup(&cfg), 10, "the ratio decides over warmup_steps");
        assert!((lr_at(&cfg, 4) - 0.5).abs() < 1e-12);
        assert!((lr_at(&cfg, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 55) - 0.5).abs() < 1e-12);
        assert!((lr_at(&cfg, 100) - 0.0).abs() < 1e-12);
        cfg.min_lr_ratio = 0.2;
        assert!((lr_at(&cfg, 55) - 0.6).abs() < 1e-12);
        cfg.lr_scheduler = LrScheduler::Constant;
        assert!((lr_at(&cfg, 4) - 0.5).abs() < 1e-12);
        assert!((10..=100).all(|s| lr_at(&cfg, s) == 1.0));
        // A ratio rounds up, as transformers' `get_warmup_steps` does.
        (cfg.steps, cfg.warmup_ratio) = (33, Some(0.1));
        assert_eq!(warmup(&cfg), 4);
    }

    /// transformers' names for the schedules read as temper's.
    #[test]
    fn schedules_read_by_transformers_names() {
        for (name, want) in [
            ("cosine", LrScheduler::Cosine),
            ("cosine_with_min_lr", LrScheduler::Cosine),
            ("linear", LrScheduler::Linear),
            ("constant_with_warmup", LrScheduler::Constant),
        ] {
            let t: TrainConfig = toml::from_str(&format!("lr_scheduler = \"{name}\"")).unwrap();
            assert_eq!(t.lr_scheduler, want, "{name}");
        }
        assert!(toml::from_str::<TrainConfig>("lr_scheduler = \"polynomial\"").is_err());
    }

    /// A `warmup_steps` a file chose, longer than the run, is said with the file's line;
    /// the default, or one that fits, or one replaced after the file (a preset's), is not.
    #[test]
    fn a_chosen_warmup_longer_than_the_run_is_said() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("c.toml");
        std::fs::write(&file, "[train]\nsteps = 5\nwarmup_steps = 50\n").unwrap();
        let mut cfg = TrainConfig {
            steps: 5,
            warmup_steps: 50,
            ..TrainConfig::default()
        };
        assert_eq!(warmup_cut(&cfg), None, "the default is cut silently");
        cfg.warmup_steps_from = Some((file.clone(), 50));
        let said = warmup_cut(&cfg).unwrap();
        assert!(
            said.contains("c.toml:3: train.warmup_steps = 50") && said.contains("first 4"),
            "{said}"
        );
        cfg.warmup_steps = 700;
        assert_eq!(warmup_cut(&cfg), None, "not the file's value");
        (cfg.warmup_steps, cfg.steps) = (50, 50);
        assert_eq!(warmup_cut(&cfg), None, "it fits");
    }
}
