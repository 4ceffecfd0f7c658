//! `--profile N`: N timed steps after the warm-up, a region table on the terminal and
//! `profile.json` in the run directory whose regions account for the whole step.

mod common;

use common::*;

#[test]
fn profile_times_the_step_by_region() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let run = p(d.path(), "run");
    let out = run_ok(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--device",
        "cpu",
        "--profile",
        "3",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("profile: 3 steps after 2 warm-up"), "{err}");
    // What a profiled run replaces is refused, not dropped.
    let e = run_err(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        p(d.path(), "other").to_str().unwrap(),
        "--profile",
        "3",
        "--steps",
        "100",
        "--eval-every",
        "7",
    ]);
    assert!(
        e.contains("--steps, --eval-every would change nothing beside profile 3"),
        "{e}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("profile.json")).unwrap()).unwrap();
    assert_eq!(v["steps"], 3);
    let regions = v["regions"].as_array().unwrap();
    let names: Vec<&str> = regions
        .iter()
        .map(|r| r["region"].as_str().unwrap())
        .collect();
    for want in ["forward", "backward", "optimizer"] {
        assert!(names.contains(&want), "{names:?}");
    }
    // Per-op rows appear for our kernel ops; on a CPU every op takes its reference, so none.
    assert!(v["ops"].is_array(), "{v}");
    // The graph's shape: a transformer's loss has many nodes holding its activations.
    let g = &v["graph"];
    assert!(g["nodes"].as_u64().unwrap() > 20, "{g}");
    let (held, zeroed) = (
        g["held_bytes"].as_u64().unwrap(),
        g["zero_filled_bytes"].as_u64().unwrap(),
    );
    assert!(held > 0 && zeroed >= held / 2, "{g}");
    assert!(err.contains("autograd graph of a micro-batch"), "{err}");
    let share: f64 = regions.iter().map(|r| r["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-6);
    for r in regions {
        assert!(r["ms_per_step"].as_f64().unwrap() >= 0.0);
    }
    // The run stops after warm-up + timed steps.
    assert_eq!(series(&metrics(&run), "train", "loss").last().unwrap().0, 5);
}
