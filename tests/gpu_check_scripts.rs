//! scripts/gpu-check.sh is the one device call that verifies the GPU side, and device time is
//! scarce: a typo found there costs the whole call. This checks on CPU CI what can be checked
//! without a GPU: every script parses, the final table turns the benches' JSON lines (as the
//! benches and their PyTorch peers print them) into the right ratios, a failed section shows
//! as failed, the ncu summary's classifier knows every entry point in kernels/ as ours, every
//! section belongs to one of TEMPER_CHECK_PART's parts, and the whole script runs through
//! against a fake bundle (the control flow between its sections).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::kernel_sources::entry_points;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// python3, or None after saying why the test is skipped.
fn python() -> Option<&'static str> {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: python3 not found; the gpu-check scripts were not checked");
    }
    ok.then_some("python3")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("temper-gpu-check-{}-{name}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scripts(ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(root().join("scripts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn every_script_parses() {
    let sh = scripts("sh");
    assert!(sh.len() >= 5, "found only {} shell scripts", sh.len());
    for s in &sh {
        run(Command::new("bash").arg("-n").arg(s));
    }
    let Some(py) = python() else { return };
    let py_files = scripts("py");
    assert!(
        py_files.len() >= 6,
        "found only {} python scripts",
        py_files.len()
    );
    // Parsed, not imported: the peers import torch, which only the device has.
    run(Command::new(py)
        .arg("-c")
        .arg("import ast, sys\nfor f in sys.argv[1:]: ast.parse(open(f).read(), f)")
        .args(&py_files));
}

/// One line of each kind the table reads, formatted as its emitter formats it, tagged with
/// its section as gpu-check.sh tags it.
const RESULTS: &str = r#"{"section":"device","bench":"device","name":"NVIDIA H200","torch":"2.11","cuda":"13.0"}
{"section":"device","status":"ok","seconds":3}
{"section":"train-ours","bench":"train_step","impl":"ours","batch":16,"seq":1024,"ms":40.000,"tokens_per_s":409600.0,"first_loss":10.98,"last_loss":9.10,"pool_peak_gib":12.5}
{"section":"train-ours","status":"ok","seconds":40,"peak_mib":14000}
{"section":"train-torch-eager","bench":"train_step","impl":"torch-eager","batch":16,"seq":1024,"params":124475904,"ms":46.5,"tokens_per_s":352300.0,"first_loss":10.99,"last_loss":9.2,"warmup_s":2.0,"peak_alloc_gib":16.1,"peak_reserved_gib":17.0,"torch":"2.11"}
{"section":"train-torch-eager","status":"ok","seconds":30,"peak_mib":17500}
{"section":"train-torch-compile","status":"timeout after 240 s","seconds":240}
{"bench":"ncu_step","kernel":"nvjet_tst_128x256","kind":"cuBLAS","launches":10,"ms":6.0,"share":0.6}
{"bench":"ncu_step","kernel":"attn_fwd_mma_bf16_h64","kind":"attention (ours)","launches":12,"ms":3.0,"share":0.3}
{"bench":"ncu_step","kernel":"affine_f32","kind":"other (candle's or the runtime's)","launches":2,"ms":1.0,"share":0.1}
{"section":"bench-attention","bench":"attention","shape":"B4 H12 T1024 D64 causal","impl":"ours-mma","pass":"fwd","ms":0.1,"tflops":210.00}
{"section":"peer-attention","bench":"attention","shape":"B4 H12 T1024 D64 causal","impl":"torch-flash","pass":"fwd","ms":0.07,"tflops":300.0}
{"section":"bench-attention","bench":"attention","shape":"B4 H12 T1024 D64 causal","impl":"ours-mma","pass":"fwd+bwd","ms":0.35,"tflops":210.0}
{"section":"peer-attention","bench":"attention","shape":"B4 H12 T1024 D64 causal","impl":"torch-flash","pass":"fwd+bwd","ms":0.22,"tflops":334.09}
{"section":"peer-attention","bench":"attention","shape":"B4 H12 T1024 D64 causal","impl":"torch-cudnn","error":"cuDNN attention not available"}
{"section":"bench-attention-packed","bench":"attention_packed","shape":"packed B8 H16 S2048 D128","impl":"ours","pass":"fwd","ms":0.3,"tflops":100.0}
{"section":"peer-attention-packed","bench":"attention_packed","shape":"packed B8 H16 S2048 D128","impl":"torch-flex","pass":"fwd","ms":0.4,"tflops":75.0}
{"section":"peer-attention-packed","bench":"attention_packed","shape":"packed B8 H16 S2048 D128","impl":"torch-flash-causal","pass":"fwd","ms":0.6,"tflops":50.0}
{"section":"bench-lora","bench":"lora","shape":"r16 M8192 K4096 N4096","impl":"fused","fwd_ms":0.4200,"fwd_bwd_ms":1.2000}
{"section":"bench-lora","bench":"lora","shape":"r16 M8192 K4096 N4096","impl":"ours-gemm","fwd_ms":0.4368,"fwd_bwd_ms":1.1000}
{"section":"bench-lora","bench":"lora","shape":"r16 M8192 K4096 N4096","impl":"ours-gemm-timed","fwd_ms":0.3640,"fwd_bwd_ms":1.0000}
{"section":"train-gemm-timed","bench":"train_step","impl":"ours","batch":16,"seq":1024,"ms":44.000,"tokens_per_s":450560.0,"first_loss":10.98,"last_loss":9.10,"pool_peak_gib":12.5}
{"section":"peer-lora","bench":"lora","shape":"r16 M8192 K4096 N4096","impl":"torch-plain","fwd_ms":0.364,"fwd_bwd_ms":1.05}
{"section":"bench-train_ops","bench":"train_ops","op":"adamw","shape":"124475904 params","impl":"ours","drive":"direct","fwd_ms":0.9,"fwd_bwd_ms":null,"gbps":3000.0}
{"section":"peer-train_ops","bench":"train_ops","op":"adamw","shape":"124475904 params","impl":"torch","drive":null,"fwd_ms":1.8}
{"section":"bench-gae","bench":"gae","shape":"B64 T512","impl":"ours-kernel","ms":0.01000,"gbps":2000.0}
{"section":"peer-gae","bench":"gae","shape":"B64 T512","impl":"torch-trl-loop","ms":5.0}
{"section":"peer-copy","bench":"copy","impl":"torch","ms":0.5,"gbps":4100.0}
{"section":"bench-generate","bench":"generate","shape":"B64 L256 N128","impl":"temper","tokens_per_s":40000.0,"ms_decode_step":1.5,"ms_floor_step":0.75}
{"section":"peer-generate","bench":"generate","shape":"B64 L256 N128","impl":"transformers-generate","tokens_per_s":8000.0,"ms_total":1024.0}
{"section":"bench-generate-timed","bench":"generate","shape":"B64 L256 N128","impl":"ours-gemm-timed","tokens_per_s":48000.0,"ms_decode_step":1.2,"ms_floor_step":0.75}
{"section":"gpt2-loss","status":"ok","seconds":30}
{"section":"gpt2-loss","bench":"loss_spikes","run":"gpt2 preset, warmup 100","logged":400,"last_step":400,"first":5.61,"min":1.2,"last":1.25,"max_rise":0.31,"max_rise_step":212,"spikes":0,"first_spike_step":null,"nonfinite":0,"skip":10,"window":10,"rise":1.0}
{"section":"bench-generate-fixed","bench":"generate","shape":"B64 L256 N128","impl":"ours-fixed-shapes","tokens_per_s":20000.0,"ms_decode_step":3.0,"ms_floor_step":0.75}
{"section":"ppo-update","bench":"ppo_update","step":1,"gen_share":0.4,"gen_s":4.0,"score_s":1.0,"train_s":5.0,"gen_tokens_per_s":2048.0,"gen_graph_replays":127}
{"section":"bench-attention","bench":"check","of":"attention","shape":"B2 H4 T100 D64","impl":"ours-mma","what":"direct backward vs autograd","max_rel_diff":1.5e-03}
{"section":"bench-lora","bench":"check","of":"lora","shape":"r16 M64 K64 N64","impl":"fused","what":"direct backward vs autograd","max_rel_diff":inf}
{"section":"ncu-decode","bench":"generate","shape":"B64 L256 N8","impl":"temper","tokens_per_s":900.0,"ms_decode_step":30.0,"ms_floor_step":0.75}
{"bench":"ncu_decode","kernel":"sample_bf16","kind":"temper kernel","launches":1,"ms":0.0,"share":0.0}
{"bench":"ncu_lora","kernel":"lora_dy_bf16_r16","kind":"temper kernel","launches":1,"ms":0.02,"share":0.1}
{"section":"bench-gae","bench":"gae","shape":"B64 T5
{"section":"test-gpu_train_ops","bench":"tests","impl":"test-gpu_train_ops","passed":30,"failed":1,"skipped":0}
{"section":"test-gpu_train_ops","status":"failed (exit 101)","seconds":20}
"#;

fn table_rows(md: &str, what: &str, metric: &str, peer: &str) -> Vec<Vec<String>> {
    md.lines()
        .filter(|l| l.starts_with("| "))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|c| c.len() >= 7 && c[0] == what && c[2] == metric && c[4] == peer)
        .collect()
}

/// The ratio column of the one row for (what, metric, peer).
fn ratio(md: &str, what: &str, metric: &str, peer: &str) -> String {
    let rows = table_rows(md, what, metric, peer);
    assert_eq!(
        rows.len(),
        1,
        "rows for {what} / {metric} / {peer}: {rows:?}\n{md}"
    );
    rows[0][6].clone()
}

#[test]
fn the_table_divides_each_measurement_by_its_peer_from_the_same_run() {
    let Some(py) = python() else { return };
    let dir = scratch("table");
    let results = dir.join("results.jsonl");
    fs::write(&results, RESULTS).unwrap();
    let md = run(Command::new(py)
        .arg(root().join("scripts/gpu_check_table.py"))
        .arg(&results)
        .arg("123"));
    assert!(md.starts_with("# gpu-check (123 s)"), "{md}");
    assert!(
        md.contains("device: NVIDIA H200, torch 2.11, CUDA 13.0"),
        "{md}"
    );

    let step = "GPT-2 124M train step";
    // 409600 / 352300 tokens/s; 14000 / 17500 MiB; 12.5 / 16.1 GiB.
    assert_eq!(ratio(&md, step, "tokens/s", "torch-eager"), "1.16");
    assert_eq!(
        ratio(&md, step, "peak GPU MiB (nvidia-smi)", "torch-eager"),
        "0.80"
    );
    assert_eq!(
        ratio(
            &md,
            step,
            "peak GiB allocated (allocator's own)",
            "torch-eager"
        ),
        "0.78"
    );
    // The compile peer timed out: no ratio, and the row says why.
    let compile = table_rows(&md, step, "tokens/s", "torch-compile");
    assert_eq!(compile[0][6], "-", "{compile:?}");
    assert!(compile[0][7].contains("train-torch-compile: timeout after 240 s"));

    assert_eq!(
        ratio(&md, "attention causal", "fwd TFLOP/s", "torch-flash"),
        "0.70"
    );
    assert_eq!(
        ratio(&md, "attention causal", "fwd TFLOP/s", "torch-cudnn"),
        "-"
    );
    // The backward alone, (fwd+bwd) - fwd on both sides: 2.5 * 21 GFLOP over 0.25 ms (ours)
    // and over 0.15 ms (flash); no wide-tile run, so its row has no ratio.
    let bwd = "bwd TFLOP/s ((fwd+bwd) - fwd)";
    assert_eq!(ratio(&md, "attention causal", bwd, "torch-flash"), "0.60");
    assert_eq!(ratio(&md, "attention, wide tiles", bwd, "torch-flash"), "-");
    // Packed rows: 0.3 ms over FlexAttention's 0.4 and flash causal's 0.6.
    let packed = "attention, document mask";
    assert_eq!(ratio(&md, packed, "fwd ms", "torch-flex"), "0.75");
    assert_eq!(ratio(&md, packed, "fwd ms", "torch-flash-causal"), "0.50");
    assert_eq!(ratio(&md, "LoRA fused", "fwd ms", "torch-plain"), "1.15");
    // The default GEMM and the timed ablation each get their own row.
    assert_eq!(
        ratio(&md, "our cuBLASLt GEMM (gemm)", "fwd ms", "torch-plain"),
        "1.20"
    );
    assert_eq!(
        ratio(
            &md,
            "our cuBLASLt GEMM, candidates timed",
            "fwd ms",
            "torch-plain"
        ),
        "1.00"
    );
    // 450560 / 409600 tokens/s: the ablation over ours.
    assert_eq!(
        ratio(&md, step, "tokens/s", "temper (cuBLASLt's first answers)"),
        "1.10"
    );
    assert_eq!(
        ratio(&md, "AdamW step (clipped)", "step ms", "torch"),
        "0.50"
    );
    assert!(
        table_rows(&md, "AdamW step (clipped)", "fwd+bwd ms", "torch").is_empty(),
        "AdamW has no backward row"
    );
    assert_eq!(ratio(&md, "GAE", "ms", "torch-trl-loop"), "0.002");
    assert_eq!(ratio(&md, "GAE", "GB/s", "torch copy"), "0.49");
    assert_eq!(
        ratio(&md, "generate", "tokens/s", "transformers-generate"),
        "5.00"
    );
    assert_eq!(
        ratio(
            &md,
            "generate decode step",
            "ms",
            "bandwidth floor (4.1 TB/s)"
        ),
        "2.00"
    );
    // The timed-GEMM ablation: its own tokens/s row and its own decode step over the floor.
    let timed = table_rows(
        &md,
        "generate",
        "ours-gemm-timed tokens/s",
        "transformers-generate",
    );
    assert_eq!(timed[0][6], "6.00", "{timed:?}");
    assert!(timed[0][7].contains("TEMPER_GEMM_TUNE=timed"), "{timed:?}");
    assert_eq!(
        ratio(
            &md,
            "generate decode step",
            "gemm-timed ms",
            "bandwidth floor (4.1 TB/s)"
        ),
        "1.60"
    );
    assert_eq!(
        ratio(
            &md,
            "generate decode step",
            "fixed-shapes ms",
            "bandwidth floor (4.1 TB/s)"
        ),
        "4.00"
    );
    assert!(md.contains("generation share 0.40 (goal < 0.5)"), "{md}");
    assert!(
        md.contains("Training loss of gpt2 preset, warmup 100 (ok): to step 400, first 5.610")
            && md.contains("largest rise over the baseline 0.310 (step 212); no spike"),
        "{md}"
    );
    // ncu: shares by kind, largest first.
    assert!(md.contains("ncu, one steady-state step of ours"), "{md}");
    assert!(md.contains("| cuBLAS | 10 | 6.000 | 60.0% |"), "{md}");
    assert!(md.contains(
        "| attention: direct backward vs autograd | B2 H4 T100 D64 | ours-mma | 1.50e-03 |"
    ));
    // Rust prints an infinite difference as a bare `inf`: read, not a crash.
    assert!(
        md.contains("| lora: direct backward vs autograd | r16 M64 K64 N64 | fused | inf |"),
        "{md}"
    );
    // A generate line printed under ncu is not a measurement of generation.
    assert!(!md.contains("B64 L256 N8"), "{md}");
    // A decode step whose kernels all read 0 ms under ncu still gets its table.
    assert!(md.contains("ncu, one decode step of generation"), "{md}");
    assert!(
        md.contains("ncu, one fused LoRA fwd+bwd") && md.contains("`lora_dy_bf16_r16`"),
        "{md}"
    );
    // A line cut short is listed, not a crash.
    assert!(md.contains("1 results line(s) were not JSON"), "{md}");
    // A failed test executable is a failed row.
    assert!(
        md.contains("| test-gpu_train_ops | 30 | 1 | 0 | failed (exit 101) |"),
        "{md}"
    );
    fs::remove_dir_all(dir).ok();
}

/// Every entry point's name as the driver reports it: the macro-built ones with their
/// parameters pasted in (`gelu_fwd_##SUFFIX` -> `gelu_fwd_x1`).
fn entry_point_names(kernels: &Path) -> Vec<String> {
    let mut names: Vec<String> = entry_points(kernels)
        .into_iter()
        .map(|e| {
            // `attn_fwd_mma_##SUF##_h##D` and the like: every pasted parameter becomes "x1".
            let mut parts = e.name.split("##");
            let head = parts.next().unwrap().to_string();
            head + &"x1".repeat(parts.count())
        })
        .collect();
    names.sort();
    names
}

#[test]
fn ncu_summary_counts_every_kernel_of_ours_as_ours() {
    let Some(py) = python() else { return };
    let kernels = root().join("kernels");
    let ours = entry_point_names(&kernels);
    assert!(ours.len() >= 50, "found only {} entry points", ours.len());
    let dir = scratch("ncu");
    let csv = dir.join("ncu.csv");
    let mut text = String::from(
        "\"ID\",\"Kernel Name\",\"Invocations\",\"Metric Name\",\"Metric Unit\",\"Minimum\",\"Maximum\",\"Average\"\n",
    );
    let mut line = |name: &str, n: u32, unit: &str, avg: &str| {
        text.push_str(&format!(
            "\"0\",\"{name}\",\"{n}\",\"gpu__time_duration.sum\",\"{unit}\",\"0\",\"0\",\"{avg}\"\n"
        ));
    };
    for name in &ours {
        line(&format!("{name}(Params)"), 1, "usecond", "1.00");
    }
    line(
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm>(Params)",
        4,
        "msecond",
        "1.50",
    );
    line(
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT",
        2,
        "usecond",
        "500",
    );
    line("affine_f32", 1000, "nsecond", "2,000");
    fs::write(&csv, text).unwrap();
    let out = run(Command::new(py)
        .arg(root().join("scripts/gpu_check_ncu.py"))
        .arg(&csv)
        .arg(&kernels)
        .arg("ncu_step"));
    let mut by_kind = std::collections::BTreeMap::<String, (u32, f64)>::new();
    let mut other = Vec::new();
    for l in out.lines() {
        let row: serde_json::Value = serde_json::from_str(l).unwrap();
        let kind = row["kind"].as_str().unwrap().to_string();
        let e = by_kind.entry(kind.clone()).or_default();
        e.0 += row["launches"].as_u64().unwrap() as u32;
        e.1 += row["ms"].as_f64().unwrap();
        if kind.starts_with("other") {
            other.push(row["kernel"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(other, ["affine_f32"], "kernels of ours classed as other");
    let attn = ours.iter().filter(|n| n.starts_with("attn_")).count() as u32;
    assert_eq!(by_kind["attention (ours)"].0, attn);
    assert_eq!(by_kind["temper kernel"].0, ours.len() as u32 - attn);
    assert_eq!(by_kind["cuBLAS"].0, 6);
    // 4 x 1.5 ms + 2 x 0.5 ms; 1000 x 2 us ("2,000" ns, as ncu writes thousands).
    assert!((by_kind["cuBLAS"].1 - 7.0).abs() < 1e-9, "{by_kind:?}");
    assert!((by_kind["other (candle's or the runtime's)"].1 - 2.0).abs() < 1e-9);
    fs::remove_dir_all(dir).ok();
}

/// scripts/loss_spikes.py on metrics written as temper writes them: a falling run has no
/// spike; a rise past the threshold over the baseline (the lowest 10-step mean so far) after
/// the skipped steps is one, at its step, and the same rise inside them is not; a NaN loss
/// (serde_json writes `null`) counts; val lines do not.
#[test]
fn loss_spikes_finds_a_rise_over_the_baseline() {
    let Some(py) = python() else { return };
    let dir = scratch("spikes");
    let spikes = |losses: &[(usize, Option<f64>)]| -> serde_json::Value {
        let mut text =
            String::from("{\"loss\":11.0,\"perplexity\":1.0,\"split\":\"val\",\"step\":0}\n");
        for &(step, loss) in losses {
            let loss = loss.map_or("null".to_string(), |l| l.to_string());
            text += &format!(
                "{{\"grad_norm\":1.0,\"loss\":{loss},\"lr\":0.0006,\"split\":\"train\",\"step\":{step}}}\n"
            );
            text += &format!("{{\"loss\":99.0,\"split\":\"val\",\"step\":{step}}}\n");
        }
        let path = dir.join("metrics.jsonl");
        fs::write(&path, text).unwrap();
        let out = run(Command::new(py)
            .arg(root().join("scripts/loss_spikes.py"))
            .arg(&dir)
            .args(["--skip", "15", "--window", "10", "--rise", "1.0"]));
        serde_json::from_str(out.trim()).unwrap()
    };
    let falling: Vec<(usize, Option<f64>)> = (1..=40)
        .map(|s| (s, Some(8.0 / s as f64 + 0.1 * ((s % 3) as f64))))
        .collect();
    let r = spikes(&falling);
    assert_eq!(r["spikes"], 0, "{r}");
    assert_eq!(
        (r["logged"].clone(), r["last_step"].clone()),
        (40.into(), 40.into()),
        "{r}"
    );
    assert!(r["max_rise"].as_f64().unwrap() < 1.0, "{r}");

    let mut spiking = falling.clone();
    spiking[29].1 = Some(spiking[29].1.unwrap() + 2.0);
    let r = spikes(&spiking);
    assert_eq!(r["spikes"], 1, "{r}");
    assert_eq!(r["first_spike_step"], 30, "{r}");
    assert_eq!(r["max_rise_step"], 30, "{r}");

    let mut early = falling.clone();
    // Step 13: past the first 10-step mean, so only the skip keeps it out.
    early[12].1 = Some(early[12].1.unwrap() + 2.0);
    assert_eq!(
        spikes(&early)["spikes"],
        0,
        "a rise inside the skipped steps"
    );

    let mut nan = falling;
    nan[20].1 = None;
    let r = spikes(&nan);
    assert_eq!(
        (r["nonfinite"].clone(), r["spikes"].clone()),
        (1.into(), 1.into()),
        "{r}"
    );
    assert_eq!(r["first_spike_step"], 21, "{r}");
    fs::remove_dir_all(dir).ok();
}

/// The names inside a bash array assignment `NAME=(...)` of scripts/gpu-check.sh (it may span
/// lines).
fn bash_array(script: &str, name: &str) -> Vec<String> {
    let start = script
        .find(&format!("\n{name}=("))
        .unwrap_or_else(|| panic!("gpu-check.sh has no {name}=(...)"));
    let body = &script[start + name.len() + 3..];
    let end = body.find(')').expect("the array closes");
    body[..end]
        .split_whitespace()
        .map(|w| w.trim_matches('\'').to_string())
        .collect()
}

/// TEMPER_CHECK_PART's three parts cover every section of scripts/gpu-check.sh once (the
/// shared ones aside), and name none that does not exist: a section added without a part
/// would never run in a split check, and a misspelt name would silently run nothing.
#[test]
fn every_section_is_in_exactly_one_part() {
    let script = fs::read_to_string(root().join("scripts/gpu-check.sh")).unwrap();
    let mut sections: Vec<String> = Vec::new();
    for line in script.lines().map(str::trim_start) {
        let line = line.strip_prefix("MEM=1 ").unwrap_or(line);
        if let Some(rest) = line.strip_prefix("section ") {
            let name = rest.split_whitespace().next().unwrap();
            if !name.contains('$') {
                sections.push(name.to_string());
            }
        }
    }
    let specs = script
        .split("for spec in ")
        .nth(1)
        .expect("the kernel benches' loop")
        .split("; do")
        .next()
        .unwrap();
    for spec in specs.split_whitespace().filter(|w| *w != "\\") {
        let bench = spec.split(':').next().unwrap();
        sections.push(format!("bench-{bench}"));
        sections.push(format!("peer-{bench}"));
    }
    assert!(sections.len() >= 30, "found only {sections:?}");
    let shared = bash_array(&script, "SHARED");
    let parts: Vec<Vec<String>> = ["PART_1", "PART_2", "PART_3"]
        .iter()
        .map(|p| bash_array(&script, p))
        .collect();
    for s in &sections {
        let homes = parts.iter().filter(|p| p.contains(s)).count();
        let expected = usize::from(!shared.contains(s));
        assert_eq!(homes, expected, "section {s} is in {homes} parts");
    }
    for name in parts.iter().flatten().chain(&shared) {
        assert!(
            name == "test-.*" || sections.contains(name),
            "part entry {name} names no section"
        );
    }
    assert!(parts[0].contains(&"test-.*".to_string()));
}

/// The stand-in for `.gpu/run-on-device.sh` in the dry run below: it lists a bundle and
/// answers each executable with lines of the shape the real one prints (the temper CLI writes
/// the metrics its sections read).
const FAKE_BUNDLE: &str = r#"#!/usr/bin/env bash
name="$1"; shift
arg() { local want="$1"; shift; while (($#)); do [[ "$1" == "$want" ]] && { echo "$2"; return; }; shift; done; }
case "$name" in
  list) printf '%s\n' test-gpu_fake bench-train_step bench-generate bench-attention bench-lora \
          bench-train_ops bench-rmsnorm bench-gae bench-allreduce temper ;;
  test-*) echo "test result: ok. 2 passed; 0 failed; 0 ignored"; echo "SKIPPED (no CUDA device): x" ;;
  bench-train_step)
    echo "{\"bench\":\"train_step\",\"impl\":\"$(arg --impl "$@")\",\"batch\":16,\"seq\":1024,\"ms\":40.0,\"tokens_per_s\":409600.0,\"first_loss\":10.9,\"last_loss\":9.1,\"pool_peak_gib\":8.2}" ;;
  bench-generate)
    impl=temper
    case "$(arg --decode "$@")" in fixed) impl=ours-fixed-shapes ;; dynamic) impl=ours-dynamic-shapes ;; esac
    [[ "${TEMPER_GEMM_TUNE:-}" == timed ]] && impl=ours-gemm-timed
    echo "{\"bench\":\"generate\",\"shape\":\"B64 L256 N128\",\"impl\":\"$impl\",\"tokens_per_s\":30000.0,\"ms_decode_step\":1.5,\"ms_floor_step\":0.75}" ;;
  bench-attention) echo '{"bench":"attention","shape":"B4 H12 T1024 D64 causal","impl":"ours-mma","pass":"fwd","ms":0.1,"tflops":200.0}' ;;
  bench-lora) echo '{"bench":"lora","shape":"r16 M8192 K4096 N4096","impl":"fused","fwd_ms":0.42,"fwd_bwd_ms":0.9}' ;;
  bench-*) echo "{\"bench\":\"${name#bench-}\",\"shape\":\"s\",\"impl\":\"ours\",\"ms\":1.0}" ;;
  temper)
    out="$(arg --out "$@")"; mkdir -p "$out"
    case "$1" in
      pretrain) for s in $(seq 1 40); do
          echo "{\"loss\":$(awk "BEGIN{print 1 + 5 / $s}"),\"split\":\"train\",\"step\":$s}"
        done >"$out/metrics.jsonl" ;;
      ppo) echo '{"step":1,"split":"train","gen_s":1.0,"score_s":0.1,"train_s":2.0,"gen_tokens_per_s":8192.0,"gen_graph_replays":127}' >"$out/metrics.jsonl" ;;
    esac ;;
  *) echo "fake bundle: no $name" >&2; exit 3 ;;
esac
"#;

/// One run of scripts/gpu-check.sh from a copy of scripts/ beside the fake bundle above, with
/// a `torch` that refuses to import (every PyTorch peer fails at once, as a failed section).
/// Returns the table, the raw results and the script's stderr.
fn dry_run(part: Option<&str>) -> (String, String, String) {
    let dir = scratch(&format!("dry-{}", part.unwrap_or("all")));
    let copy = |from: &Path, to: &Path| {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
            }
        }
    };
    copy(&root().join("scripts"), &dir.join("scripts"));
    fs::create_dir_all(dir.join(".gpu")).unwrap();
    let bundle = dir.join(".gpu/run-on-device.sh");
    fs::write(&bundle, FAKE_BUNDLE).unwrap();
    run(Command::new("chmod").arg("+x").arg(&bundle));
    fs::write(dir.join(".gpu/bundle.tar.xz"), b"").unwrap();
    let notorch = dir.join("notorch");
    fs::create_dir_all(&notorch).unwrap();
    fs::write(
        notorch.join("torch.py"),
        "raise ImportError('no torch in the dry run')\n",
    )
    .unwrap();
    let out = dir.join("out");
    let mut cmd = Command::new("bash");
    cmd.arg(dir.join("scripts/gpu-check.sh"))
        .env("OUT", &out)
        .env("PYTHONPATH", &notorch)
        .env("TEMPER_CHECK_BUDGET_S", "300")
        .env_remove("TEMPER_CHECK_ONLY")
        .env_remove("TEMPER_CHECK_PART");
    if let Some(p) = part {
        cmd.env("TEMPER_CHECK_PART", p);
    }
    let o = cmd.output().expect("spawn bash");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let md = fs::read_to_string(out.join("gpu-check.md"))
        .unwrap_or_else(|e| panic!("no gpu-check.md ({e}); stderr:\n{stderr}"));
    let results = fs::read_to_string(out.join("results.jsonl")).unwrap();
    fs::remove_dir_all(dir).ok();
    (md, results, stderr)
}

/// The whole of scripts/gpu-check.sh runs through on the CPU against a fake bundle: every
/// section ends with a status, the temper sections' lines reach the table, nothing trips
/// bash's unset-variable check or a missing script, and TEMPER_CHECK_PART keeps to its part.
/// What `bash -n` and the table's fixtures cannot see: the control flow between the sections.
#[test]
fn the_whole_check_runs_through_on_a_fake_bundle() {
    if python().is_none() {
        return;
    }
    let (md, results, stderr) = dry_run(None);
    // Signs of a broken script, each with what a line must also hold to count (a peer's
    // expected ImportError is neither).
    for (bad, with) in [
        ("unbound variable", ""),
        ("syntax error", ""),
        ("No such file", "scripts/"),
        ("the table script failed", ""),
    ] {
        let hits: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(bad) && l.contains(with))
            .collect();
        assert!(hits.is_empty(), "{bad}: {hits:?}\n{stderr}");
    }
    let status = |name: &str| -> Option<String> {
        results.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["section"] == name && v.get("status").is_some())
                .then(|| v["status"].as_str().unwrap().to_string())
        })
    };
    for s in [
        "unpack",
        "test-gpu_fake",
        "train-ours",
        "bench-generate",
        "ppo-init",
        "ppo-update",
        "gpt2-loss",
        "bench-attention",
        "bench-lora",
        "train-attn-wide",
        "pipeline",
        "train-reference",
    ] {
        assert_eq!(status(s).as_deref(), Some("ok"), "{s}\n{stderr}");
    }
    assert!(
        status("train-torch-eager").is_some_and(|s| s.starts_with("failed")),
        "{results}"
    );
    assert!(md.contains("| test-gpu_fake | 2 | 0 | 1 | ok |"), "{md}");
    assert!(
        md.contains("Training loss of gpt2 preset, warmup 100 (ok): to step 40"),
        "{md}"
    );
    assert!(md.contains("PPO update at GPT-2 small, step 1"), "{md}");
    assert!(
        md.contains("| generate decode step | B64 L256 N128 | fixed-shapes ms |"),
        "{md}"
    );

    let (_, results, stderr) = dry_run(Some("2"));
    let ran = |name: &str| {
        results
            .lines()
            .any(|l| l.contains(&format!("\"section\":\"{name}\",\"status\":\"ok\"")))
    };
    assert!(
        ran("gpt2-loss") && ran("train-ours") && ran("unpack"),
        "{stderr}"
    );
    assert!(
        !ran("bench-attention") && !ran("test-gpu_fake") && !ran("pipeline"),
        "{results}"
    );
}
