//! Linear warmup, then cosine decay to `min_lr_ratio * lr` at the last step.

use crate::config::TrainConfig;

pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    let warm = cfg.warmup_steps.min(cfg.steps.saturating_sub(1));
    if step < warm {
        return cfg.lr * (step + 1) as f64 / warm as f64;
    }
    let span = (cfg.steps - warm).max(1) as f64;
    let progress = ((step - warm) as f64 / span).min(1.0);
    let min = cfg.lr * cfg.min_lr_ratio;
    min + 0.5 * (cfg.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
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
}
