//! Data parallelism and preemption on the CPU: two ranks (launched processes, torchrun-style
//! processes, or threads) give one rank's curve with the doubled batch, sharded and unsharded
//! optimizer state give the same weights, a SIGTERM (to a run or to a launch) checkpoints and
//! stops with its own exit status and `--resume` continues on the same curve, and a rank that
//! cannot reach rank 0 fails within its timeout.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn losses(run: &Path) -> Vec<(u64, f64)> {
    series(&metrics(run), "train", "loss")
}

#[test]
fn two_ranks_follow_one_rank_with_the_doubled_batch() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    let text = TINY_TOML.replace("batch_size = 16", "batch_size = 8\nlog_every = 1");
    std::fs::write(&cfg, text).unwrap();
    let (one, two) = (p(d.path(), "one"), p(d.path(), "two"));
    let args = [
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "8",
        "--eval-every",
        "8",
        "--device",
        "cpu",
    ];
    one_rank_and_two(&["pretrain"], &args, &one, &two);
    let (x, y) = (losses(&one), losses(&two));
    assert_eq!(x.len(), 8, "{x:?}");
    assert_same_curve(&x, &y);
    // The held-out loss scores the same windows (eval_batches global batches), so it
    // agrees as the weights do, to float reassociation.
    let (vx, vy) = (
        series(&metrics(&one), "val", "loss"),
        series(&metrics(&two), "val", "loss"),
    );
    assert_eq!(vx.len(), vy.len(), "{vx:?} vs {vy:?}");
    for ((s, a), (_, b)) in vx.iter().zip(&vy) {
        assert!((a - b).abs() < 1e-3, "step {s}: held-out {a} vs {b}");
    }
    let load = |r: &Path| {
        candle_core::safetensors::load(r.join("final/model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (w1, w2) = (load(&one), load(&two));
    assert_eq!(w1.len(), w2.len());
    for (n, t) in &w1 {
        let d = max_abs_diff(t, &w2[n]);
        assert!(d < 1e-3, "{n} differs by {d}");
    }
    assert!(two.join("final/meta.json").exists());
}

#[test]
fn sigterm_checkpoints_stops_and_resume_continues_the_same_curve() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(
        &cfg,
        TINY_TOML.replace("batch_size = 16", "batch_size = 16\nlog_every = 1"),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let steps = [
        "--steps",
        "40",
        "--checkpoint-every",
        "1000",
        "--eval-every",
        "1000",
        "--device",
        "cpu",
    ];
    let full = p(d.path(), "full");
    let mut a = vec!["pretrain", "--config", cfg, "--out", full.to_str().unwrap()];
    a.extend(steps);
    run_ok(&a);
    let cut = p(d.path(), "cut");
    let mut b = vec!["pretrain", "--config", cfg, "--out", cut.to_str().unwrap()];
    b.extend(steps);
    let child = temper()
        .args(&b)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(120, "the run logged nothing", || {
        losses_if_any(&cut).len() >= 5
    });
    // Twice, as SLURM and a launcher together deliver it: the repeat within the grace period
    // must not kill the run before its checkpoint.
    for _ in 0..2 {
        sigterm(&child);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("stopped by a signal after step"), "{err}");
    let at = std::fs::read_to_string(cut.join("checkpoints/latest")).unwrap();
    let step: u64 = at.trim().trim_start_matches("step-").parse().unwrap();
    assert!((5..40).contains(&step), "checkpoint at {step}");
    run_ok(&["pretrain", "--resume", cut.to_str().unwrap()]);
    let (x, y) = (losses(&full), losses(&cut));
    assert_eq!(x.len(), y.len(), "{y:?}");
    for ((s, l1), (_, l2)) in x.iter().zip(&y) {
        assert_eq!(l1, l2, "step {s} differs after resuming from step {step}");
    }
}

/// A signal during a run's setup stops it before its first evaluation and step, which may
/// take minutes more: a resumed run keeps the checkpoint it resumed from, a fresh run writes
/// nothing. The corpus is a FIFO the run blocks on until the signal has come, so the signal
/// lands in the setup every time.
#[test]
fn a_signal_during_setup_stops_the_run_before_it_trains() {
    let d = tmp();
    let corpus = p(d.path(), "corpus.txt");
    let c = std::ffi::CString::new(corpus.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(4000);
    // Once the run opens the FIFO to read: a run that failed first would leave a plain write
    // blocked for ever.
    let feed = || {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut fifo = None;
        wait_until(120, "the run never opened its corpus", || {
            fifo = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&corpus)
                .ok();
            fifo.is_some()
        });
        let mut fifo = fifo.unwrap();
        // SAFETY: fcntl(2) on an open descriptor: blocking writes from here.
        unsafe {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&fifo);
            libc::fcntl(fd, libc::F_SETFL, 0);
        }
        fifo.write_all(text.as_bytes()).unwrap();
    };
    let run = p(d.path(), "run");
    let mut args = vec![
        "pretrain",
        "--data",
        corpus.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--seq-len",
        "32",
        "--steps",
        "3",
        "--device",
        "cpu",
    ];
    let first = temper().args(&args).spawn().unwrap();
    feed();
    assert!(first.wait_with_output().unwrap().status.success());
    let trained = losses(&run);
    // Resumed (to more steps), and signalled while it waits for its corpus.
    let stop_in_setup = |args: &[&str]| {
        use std::io::BufRead;
        let mut child = temper()
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let err = std::io::BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // The run names its device before it reads its data.
        let mut said = String::new();
        while !said.contains("] device ") {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => said += &(line + "\n"),
                Err(_) => {
                    let _ = child.kill();
                    panic!("no device line within 120 s:\n{said}");
                }
            }
        }
        sigterm(&child);
        feed();
        let status = child.wait().unwrap();
        said.extend(rx.iter().map(|l| l + "\n"));
        assert_eq!(status.code(), Some(75), "{said}");
        said
    };
    let err = stop_in_setup(&[
        "pretrain",
        "--resume",
        run.to_str().unwrap(),
        "--steps",
        "6",
    ]);
    assert!(
        err.contains("stopped by a signal after step 3, with a checkpoint there"),
        "{err}"
    );
    assert!(!err.contains("val loss"), "it evaluated: {err}");
    assert_eq!(losses(&run), trained, "it trained on");
    let fresh = p(d.path(), "fresh");
    args[4] = fresh.to_str().unwrap();
    let err = stop_in_setup(&args);
    assert!(
        err.contains("stopped by a signal before its first step, with nothing trained; run the same command again")
            && err.contains("temper: stopping once the setup is done, before the first step"),
        "{err}"
    );
    assert!(!fresh.join("checkpoints/latest").exists(), "{err}");
    assert!(losses_if_any(&fresh).is_empty(), "{err}");
    // As the line says, the same command starts it.
    let child = temper()
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    feed();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(losses(&fresh).last().map(|l| l.0), Some(3));
}

fn losses_if_any(run: &Path) -> Vec<(u64, f64)> {
    match std::fs::read_to_string(run.join("metrics.jsonl")) {
        Ok(t) => t
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["split"] == "train")
            .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
            .collect(),
        Err(_) => vec![],
    }
}

/// A rank started by torchrun's variables whose rank 0 never listens fails within
/// `TEMPER_DIST_TIMEOUT_S`, naming the address it tried.
#[test]
fn a_rank_that_cannot_reach_master_addr_fails_within_its_timeout() {
    let d = tmp();
    let port = free_port().to_string();
    let t0 = Instant::now();
    let out = temper()
        .args([
            "pretrain",
            "--out",
            p(d.path(), "r").to_str().unwrap(),
            "--steps",
            "1",
            "--device",
            "cpu",
        ])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", &port)
        .env("TEMPER_DIST_TIMEOUT_S", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        err.contains("rank 1: could not reach rank 0")
            && err.contains(&format!("127.0.0.1:{port}"))
            && err.contains("within 2 s"),
        "{err}"
    );
}

/// Ranks started by hand (torchrun's variables) with other settings (rank 1 another seed) stop
/// before training, rank 1 naming the setting: each would start from its own weights.
#[test]
fn ranks_of_other_settings_stop_before_training() {
    let d = tmp();
    let port = free_port().to_string();
    let out = p(d.path(), "r");
    let children: Vec<_> = [None, Some("99")]
        .into_iter()
        .enumerate()
        .map(|(r, seed)| {
            let mut args = vec!["pretrain", "--out", out.to_str().unwrap(), "--steps", "2"];
            args.extend(["--device", "cpu"]);
            args.extend(seed.map(|s| ["--seed", s]).into_iter().flatten());
            temper()
                .args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("TEMPER_DIST_TIMEOUT_S", "60")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let errs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            assert!(!o.status.success());
            String::from_utf8_lossy(&o.stderr).into_owned()
        })
        .collect();
    assert!(
        errs[1].contains("rank 1's settings differ from rank 0's: train.seed is 99 here"),
        "{}",
        errs[1]
    );
    assert!(
        errs[0].contains("another rank's settings differ"),
        "{}",
        errs[0]
    );
    assert!(losses_if_any(&out).is_empty(), "trained");
}

/// A signal to a rank that waits for its peers (rank 0 listening, another rank retrying its
/// connection) stops the wait and the run at once, as one during the rest of the setup does,
/// rather than after the rendezvous's timeout; a signal to rank 0 alone stops the ranks
/// already waiting on it too, since none has gone on before every rank arrived.
#[test]
fn a_signal_stops_a_rank_waiting_for_its_peers() {
    let d = tmp();
    let port = free_port().to_string();
    let rank = |r: &str| {
        temper()
            .args([
                "pretrain",
                "--out",
                p(d.path(), r).to_str().unwrap(),
                "--device",
                "cpu",
            ])
            .env("RANK", r)
            .env("WORLD_SIZE", "3")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("TEMPER_DIST_TIMEOUT_S", "120")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let stop_line = "stopped by a signal while its ranks waited for each other, its run \
                     directory untouched; run the same command again";
    let ended = |r: &str, child: std::process::Child, t0: Instant| {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(75), "rank {r}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(20), "rank {r}: {err}");
        err
    };
    // Rank 1 alone, retrying its connection: it stops, and says nothing of where the run
    // stopped (rank 0 says that).
    let alone = rank("1");
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    sigterm(&alone);
    let err = ended("1", alone, t0);
    assert!(!err.contains("stopped by a signal"), "{err}");
    // Rank 0 listening with rank 1 connected and rank 2 missing: the signal to rank 0 alone
    // stops both.
    let (zero, one) = (rank("0"), rank("1"));
    let port: u16 = port.parse().unwrap();
    wait_until(60, "rank 1 connected to rank 0", || connected_at(port));
    let t0 = Instant::now();
    sigterm(&zero);
    let err = ended("0", zero, t0);
    assert!(err.contains(stop_line), "rank 0: {err}");
    let err = ended("1", one, t0);
    assert!(!err.contains("stopped by a signal"), "rank 1: {err}");
}

/// Whether a TCP connection to local port `port` is established (the kernel's table), so
/// that a test waits for a rank to connect rather than for a guessed time.
fn connected_at(port: u16) -> bool {
    let local = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|t| {
        std::fs::read_to_string(t).is_ok_and(|table| {
            table.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3
                    && format!("{} ", &cols[1][cols[1].len() - 5..]) == local
                    && cols[3] == "01"
            })
        })
    })
}

fn free_port() -> u16 {
    temper::dist::launch::free_port().unwrap()
}

/// Two processes started with torchrun's variables (TCP, optimizer state sharded) end with
/// the weights of two thread ranks of one process (optimizer unsharded), bit for bit.
#[test]
fn torchrun_style_processes_match_thread_ranks_bit_for_bit() {
    let d = tmp();
    let write = |name: &str, shard: &str| {
        let cfg = p(d.path(), name);
        let text = TINY_TOML.replace(
            "batch_size = 16",
            &format!("batch_size = 8\nlog_every = 1\nshard_optimizer = \"{shard}\""),
        );
        std::fs::write(&cfg, text).unwrap();
        cfg.to_str().unwrap().to_string()
    };
    let (sharded, plain) = (write("on.toml", "on"), write("off.toml", "off"));
    let (procs, threads) = (p(d.path(), "procs"), p(d.path(), "threads"));
    let args = |cfg: &str, out: &Path| -> Vec<String> {
        [
            "pretrain",
            "--config",
            cfg,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "6",
            "--eval-every",
            "6",
            "--device",
            "cpu",
        ]
        .map(String::from)
        .to_vec()
    };
    let port = free_port().to_string();
    let log = |r: usize| p(d.path(), &format!("rank{r}.log"));
    let mut children: Vec<_> = (0..2)
        .map(|r| {
            temper()
                .args(args(&sharded, &procs))
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("TEMPER_DIST_TIMEOUT_S", "60")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(log(r)).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, c) in children.iter_mut().enumerate() {
        let st = c.wait().unwrap();
        assert!(st.success(), "{}", std::fs::read_to_string(log(r)).unwrap());
    }
    let mut t = vec!["launch", "--threads", "--nproc-per-node", "2", "--"];
    let targs = args(&plain, &threads);
    t.extend(targs.iter().map(String::as_str));
    run_ok(&t);
    assert_eq!(losses(&procs), losses(&threads));
    let load = |r: &Path| std::fs::read(r.join("final/model.safetensors")).unwrap();
    assert!(load(&procs) == load(&threads), "final weights differ");
}

/// SIGTERM to `temper launch` reaches every rank: they finish the step, rank 0 checkpoints,
/// the launcher exits with the preemption status, the terminal gets one line of each kind
/// (not one a rank), and `--resume` continues the curve. So does a SIGKILL of the launcher,
/// which cannot pass anything on: its ranks get SIGTERM from the kernel as it dies.
#[test]
fn a_signal_to_a_launch_checkpoints_every_rank_and_resumes_the_curve() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    let text = TINY_TOML.replace("batch_size = 16", "batch_size = 8\nlog_every = 1");
    std::fs::write(&cfg, text).unwrap();
    let cfg = cfg.to_str().unwrap();
    let run = |out: &Path| -> Vec<String> {
        [
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "pretrain",
            "--config",
            cfg,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "40",
            "--checkpoint-every",
            "1000",
            "--eval-every",
            "1000",
            "--device",
            "cpu",
        ]
        .map(String::from)
        .to_vec()
    };
    let full = p(d.path(), "full");
    run_ok(&run(&full).iter().map(String::as_str).collect::<Vec<_>>());
    for kill in [false, true] {
        let cut = p(d.path(), if kill { "killed" } else { "cut" });
        // A killed launcher's ranks hold its stderr until they end: a pipe read to its end
        // would hang the test where they never do.
        let stderr = match kill {
            true => std::process::Stdio::null(),
            false => std::process::Stdio::piped(),
        };
        let mut child = temper().args(run(&cut)).stderr(stderr).spawn().unwrap();
        wait_until(120, "the run logged nothing", || {
            losses_if_any(&cut).len() >= 5
        });
        if kill {
            child.kill().unwrap();
        } else {
            sigterm(&child);
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // The ranks outlive a killed launcher: rank 0 lets the run directory go as it exits.
        wait_until(
            120,
            "the ranks kept the run after their launcher died",
            || std::fs::File::create(cut.join(".lock")).is_ok_and(|f| f.try_lock().is_ok()),
        );
        let at = std::fs::read_to_string(cut.join("checkpoints/latest"))
            .unwrap_or_else(|e| panic!("no checkpoint (kill {kill}): {e}\n{err}"));
        let step: u64 = at.trim().trim_start_matches("step-").parse().unwrap();
        assert!((5..40).contains(&step), "checkpoint at {step}");
        if !kill {
            assert_eq!(out.status.code(), Some(75), "{err}");
            for line in [
                "temper: stopping the ranks, each after its step",
                // and no rank's own
                "temper: stopping",
                "stopped by a signal after step",
                "[pretrain] tokenizer",
            ] {
                assert_eq!(err.matches(line).count(), 1, "{line:?} in:\n{err}");
            }
        }
        run_ok(&[
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "pretrain",
            "--resume",
            cut.to_str().unwrap(),
        ]);
        let (x, y) = (losses(&full), losses(&cut));
        assert_eq!(x.len(), y.len(), "{y:?}");
        for ((s, l1), (_, l2)) in x.iter().zip(&y) {
            assert_eq!(
                l1, l2,
                "step {s} differs after resuming from step {step} (kill {kill})"
            );
        }
    }
}

/// DPO over two ranks follows one rank with the doubled batch, RPO's per-token NLL term
/// (on by default) included.
#[test]
fn dpo_over_two_ranks_follows_one_rank() {
    let d = tmp();
    preference_stage_over_one_rank_and_two(d.path(), "dpo", &[]);
}

/// Runs `stage` for 4 steps from a short pretraining on one rank at batch 16 and on two at
/// 8, with `extra` flags; asserts the two loss curves agree and returns the run directories.
fn preference_stage_over_one_rank_and_two(
    dir: &Path,
    stage: &str,
    extra: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cfg, pre) = pretrained(dir);
    let (one, two) = (p(dir, "one"), p(dir, "two"));
    let mut common = vec![
        "--config",
        cfg.as_str(),
        "--init",
        pre.to_str().unwrap(),
        "--steps",
        "4",
        "--eval-every",
        "100",
        "--device",
        "cpu",
    ];
    common.extend(extra);
    one_rank_and_two(&[stage], &common, &one, &two);
    let (x, y) = (losses(&one), losses(&two));
    assert_eq!(x.len(), 4);
    assert_same_curve(&x, &y);
    (one, two)
}

/// KTO over two ranks follows one rank with the doubled batch: each prompt borrows the
/// completion before it in the global batch, so the KL baseline is the one rank's; the
/// held-out numbers, scored in global batches, are the one rank's too.
#[test]
fn kto_over_two_ranks_follows_one_rank() {
    let d = tmp();
    let (one, two) = preference_stage_over_one_rank_and_two(d.path(), "kto", &["--lr", "1e-3"]);
    let field = |dir: &Path, split: &str, key: &str| -> Vec<f64> {
        metrics(dir)
            .iter()
            .filter(|m| m["split"] == split)
            .map(|m| m[key].as_f64().unwrap())
            .collect()
    };
    for (split, key, n) in [
        ("train", "kl", 4),
        ("val", "kl", 2),
        ("val", "label_accuracy", 2),
    ] {
        let (k1, k2) = (field(&one, split, key), field(&two, split, key));
        assert_eq!(k1.len(), n, "{split} {key}");
        assert_eq!(k2.len(), n, "{split} {key}");
        for (a, b) in k1.iter().zip(&k2) {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-4 * a.abs(),
                "{split} {key} {k1:?} vs {k2:?}"
            );
        }
    }
}

/// A tiny config logging every step, at per-rank batch 8, and a short pretraining run in
/// `dir` to start later stages from.
fn pretrained(dir: &Path) -> (String, std::path::PathBuf) {
    let cfg = p(dir, "c.toml");
    let text = TINY_TOML.replace("batch_size = 16", "batch_size = 8\nlog_every = 1");
    std::fs::write(&cfg, text).unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let pre = p(dir, "pre");
    pretrain_on_cpu(&cfg, &pre, 20);
    (cfg, pre)
}

/// Runs `stage ARGS` in one process with batch 16 into `one`, and as two launched processes
/// with batch 8 each into `two`.
fn one_rank_and_two(stage: &[&str], args: &[&str], one: &Path, two: &Path) {
    let run = |prefix: &[&str], out: &Path, batch: &str| {
        let mut a = prefix.to_vec();
        a.extend(stage);
        a.extend(["--out", out.to_str().unwrap(), "--batch-size", batch]);
        a.extend(args);
        run_ok(&a);
    };
    run(&[], one, "16");
    run(&["launch", "--nproc-per-node", "2", "--"], two, "8");
}

/// The losses of two runs are equal up to the order of float sums (relative, or absolute
/// near zero: a policy-gradient loss at ratio 1 is a sum of advantages that cancel).
fn assert_same_curve(x: &[(u64, f64)], y: &[(u64, f64)]) {
    assert_eq!(x.len(), y.len(), "{x:?} vs {y:?}");
    for ((s, l1), (_, l2)) in x.iter().zip(y) {
        assert!(
            (l1 - l2).abs() <= 1e-4 * l1.abs() + 1e-6,
            "step {s}: {l1} vs {l2}"
        );
    }
}

/// LoRA SFT over two launched ranks follows one rank with the doubled batch (every response
/// token weighs the same across ranks), and a data-parallel run resumed at another step
/// continues its own curve.
#[test]
fn lora_sft_over_two_ranks_follows_one_rank_and_resumes_exactly() {
    let d = tmp();
    let (cfg, pre) = pretrained(d.path());
    let cfg = cfg.as_str();
    let pre = pre.to_str().unwrap();
    let args = [
        "--config",
        cfg,
        "--init",
        pre,
        "--lora-rank",
        "4",
        "--eval-every",
        "100",
        "--device",
        "cpu",
    ];
    let (one, two, cut) = (p(d.path(), "one"), p(d.path(), "two"), p(d.path(), "cut"));
    let six: Vec<&str> = args.iter().copied().chain(["--steps", "6"]).collect();
    one_rank_and_two(&["sft"], &six, &one, &two);
    let (x, y) = (losses(&one), losses(&two));
    assert_eq!(x.len(), 6);
    assert_same_curve(&x, &y);
    // A run "interrupted" after step 3: its later checkpoint and final model removed.
    let mut a = vec![
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "sft",
        "--out",
        cut.to_str().unwrap(),
    ];
    a.extend(
        six.iter()
            .copied()
            .chain(["--batch-size", "8", "--checkpoint-every", "3"]),
    );
    run_ok(&a);
    std::fs::remove_dir_all(cut.join("checkpoints/step-0000006")).unwrap();
    std::fs::remove_dir_all(cut.join("final")).unwrap();
    std::fs::write(cut.join("checkpoints/latest"), "step-0000003").unwrap();
    let mut resume = vec!["launch", "--nproc-per-node", "2", "--", "sft", "--resume"];
    resume.push(cut.to_str().unwrap());
    run_ok(&resume);
    assert_eq!(
        losses(&cut),
        y,
        "the resumed data-parallel run left its curve"
    );
}

/// The reward model over two launched ranks follows one rank with the doubled batch.
#[test]
fn reward_modelling_over_two_ranks_follows_one_rank() {
    let d = tmp();
    let (cfg, pre) = pretrained(d.path());
    let cfg = cfg.as_str();
    let (one, two) = (p(d.path(), "one"), p(d.path(), "two"));
    let common = [
        "--config",
        cfg,
        "--init",
        pre.to_str().unwrap(),
        "--steps",
        "5",
        "--eval-every",
        "100",
        "--device",
        "cpu",
    ];
    one_rank_and_two(&["reward"], &common, &one, &two);
    let (x, y) = (losses(&one), losses(&two));
    assert_eq!(x.len(), 5);
    assert_same_curve(&x, &y);
}

/// GRPO over two ranks, each sampling, scoring and normalising its half of every rollout's
/// prompts (rows keyed by their place in the global rollout), follows one rank with the
/// whole rollout, and a data-parallel run resumed at another step continues its curve.
#[test]
fn grpo_over_two_ranks_follows_one_rank_and_resumes_exactly() {
    rl_over_two_ranks("grpo", false, &["policy_loss"], VARIED, &|prompts| {
        format!("[grpo]\nprompts_per_rollout = {prompts}\ngroup_size = 2\nminibatch_size = {}\neval_prompts = 4\nlog_completions = 2\n", 2 * prompts)
    });
}

/// GRPO's collectives of TRL's newer knobs hold over two ranks too: the top-entropy mask's
/// quantile over every rank's tokens, the entropy bonus weighed by each rank's share of the
/// tokens it reads, the adaptive coefficient moved by the step's entropy over every rank, and
/// GDPO's batch normalisation, under CISPO's loss, two epochs a rollout with the off-policy
/// mask (whose second epoch is off-policy).
#[test]
fn grpos_entropy_mask_and_bonus_over_two_ranks_follow_one_rank() {
    let logged = [
        "entropy_coef",
        "kl_token",
        "entropy",
        "policy_loss",
        "approx_kl",
    ];
    rl_over_two_ranks("grpo", false, &logged, VARIED, &|prompts| {
        format!("[grpo]\nprompts_per_rollout = {prompts}\ngroup_size = 2\nminibatch_size = {}\neval_prompts = 4\nlog_completions = 2\nloss_type = \"cispo\"\nepsilon_high = 5.0\nepochs = 2\noff_policy_mask_threshold = 1e-6\ntop_entropy_quantile = 0.5\nuse_adaptive_entropy = true\nentropy_coef = 0.01\nentropy_target = 100.0\nmulti_objective_aggregation = \"normalize_then_sum\"\n", 2 * prompts)
    });
}

/// PPO over two ranks (whitening over the global rollout, the value loss weighted by each
/// rank's tokens, the adaptive KL reading the global KL) follows one rank, logs the global
/// batch's loss terms, and resumes.
#[test]
fn ppo_over_two_ranks_follows_one_rank_and_resumes_exactly() {
    let logged = ["policy_loss", "value_loss", "entropy"];
    rl_over_two_ranks("ppo", false, &logged, VARIED, &|prompts| {
        format!("[ppo]\nrollout_batch = {prompts}\nminibatch_size = {prompts}\nppo_epochs = 1\neval_prompts = 4\nlog_completions = 2\n")
    });
}

/// Online DPO over two ranks, each sampling and scoring its half of the prompts (rows keyed
/// by their place in the global batch) and weighing its loss by its share of the ranked
/// pairs (and its RPO term by the step's chosen tokens), follows one rank with the whole
/// batch, logs the whole batch's pair metrics, and resumes exactly.
#[test]
fn online_dpo_over_two_ranks_follows_one_rank_and_resumes_exactly() {
    let logged = ["dpo_loss", "ranked_share", "reward_accuracy", "kl"];
    rl_over_two_ranks("online-dpo", true, &logged, VARIED, &|_| {
        "[online_dpo]\neval_prompts = 4\nlog_completions = 2\nrpo_alpha = 1.0\n".to_string()
    });
}

/// A reward that differs between samples (tests/fixtures/varied_reward.py).
const VARIED: &str = "varied_reward.py";

/// GRPO over two ranks on a reward that answers null for some responses (the ranks hold
/// different shares of them): the group and batch statistics leave them out alike, every rank
/// logs the same metrics (`unscored` over the whole rollout too), and it follows one rank.
/// Two epochs a rollout: at ratio 1 the loss is a mean of advantages, 0 when every response
/// runs to the token limit.
#[test]
fn grpo_with_unscored_responses_over_two_ranks_follows_one_rank() {
    rl_over_two_ranks(
        "grpo",
        false,
        &["unscored"],
        "partial_reward.py",
        &|prompts| {
            format!("[grpo]\nprompts_per_rollout = {prompts}\ngroup_size = 4\nminibatch_size = {}\neval_prompts = 4\nlog_completions = 2\nscale_rewards = \"batch\"\nepochs = 2\n", 4 * prompts)
        },
    );
}

/// Runs RL `stage` for 4 steps from a short pretraining, once with `table(4)` (4 prompts per
/// rollout; with `batch_prompts`, `--batch-size 4` instead) and once over two launched ranks
/// with `table(2)` (`--batch-size 2`) each, and checks that loss,
/// score, gradient norm and the metrics `logged` agree (and are not all zero); then interrupts a two-rank run after
/// step 2 and checks that `--resume` continues its curve. The table gives one optimizer step
/// per rollout: the step's gradient is then the whole rollout's on one rank and on two alike
/// (several minibatches per rollout shuffle each rank's rows apart).
fn rl_over_two_ranks(
    stage: &str,
    batch_prompts: bool,
    logged: &[&str],
    fixture: &str,
    table: &dyn Fn(usize) -> String,
) {
    let d = tmp();
    let (cfg, pre) = pretrained(d.path());
    let base = std::fs::read_to_string(&cfg).unwrap();
    let write = |name: &str, prompts: usize| {
        let f = p(d.path(), name);
        std::fs::write(&f, format!("{base}\n{}", table(prompts))).unwrap();
        f.to_str().unwrap().to_string()
    };
    let (c1, c2) = (write("one.toml", 4), write("two.toml", 2));
    let (one, two, cut) = (p(d.path(), "one"), p(d.path(), "two"), p(d.path(), "cut"));
    let pre = pre.to_str().unwrap();
    // The untrained model never solves the task: a reward that differs between samples gives
    // the advantages (and so the gradients) something to be.
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let reward = format!("cmd:python3 {}", script.display());
    let run = |launched: bool, c: &str, out: &Path, extra: &[&str]| {
        let batch = match launched {
            true => "2",
            false => "4",
        };
        let mut a: Vec<&str> = match launched {
            true => vec!["launch", "--nproc-per-node", "2", "--"],
            false => vec![],
        };
        a.extend([
            stage,
            "--config",
            c,
            "--init",
            pre,
            "--out",
            out.to_str().unwrap(),
        ]);
        a.extend(["--steps", "4", "--eval-every", "100", "--device", "cpu"]);
        a.extend(["--reward", reward.as_str()]);
        if batch_prompts {
            a.extend(["--batch-size", batch]);
        }
        a.extend(extra);
        run_ok(&a);
    };
    run(false, &c1, &one, &[]);
    run(true, &c2, &two, &[]);
    let (x, y) = (losses(&one), losses(&two));
    assert_eq!(x.len(), 4, "{x:?}");
    assert!(
        x.iter().any(|(_, l)| l.abs() > 1e-6),
        "every loss is zero: {x:?}"
    );
    assert_same_curve(&x, &y);
    let series_of = |r: &Path, k: &str| series(&metrics(r), "train", k);
    for &k in ["score", "grad_norm"].iter().chain(logged) {
        let (a, b) = (series_of(&one, k), series_of(&two, k));
        assert!(
            a.iter().any(|(_, v)| *v != 0.0),
            "{k} is zero throughout: {a:?}"
        );
        assert_same_curve(&a, &b);
    }
    // Interrupted after step 2: its later checkpoint and final model removed.
    run(true, &c2, &cut, &["--checkpoint-every", "2"]);
    std::fs::remove_dir_all(cut.join("checkpoints/step-0000004")).unwrap();
    std::fs::remove_dir_all(cut.join("final")).unwrap();
    std::fs::write(cut.join("checkpoints/latest"), "step-0000002").unwrap();
    let resume = ["launch", "--nproc-per-node", "2", "--", stage, "--resume"];
    let mut a = resume.to_vec();
    a.push(cut.to_str().unwrap());
    run_ok(&a);
    assert_eq!(
        losses(&cut),
        y,
        "the resumed data-parallel run left its curve"
    );
}

/// Distillation over two launched ranks follows one rank with the doubled batch, on the
/// students' own samples too: a sampled row draws from its place in the step's global batch,
/// and every token of it weighs the same across ranks.
#[test]
fn distill_over_two_ranks_follows_one_rank() {
    let d = tmp();
    let (cfg, pre) = pretrained(d.path());
    // A teacher that differs from the student: a longer pretraining run of its own.
    let teacher = p(d.path(), "teacher");
    pretrain_on_cpu(&cfg, &teacher, 30);
    let (one, two) = (p(d.path(), "one"), p(d.path(), "two"));
    for (lmbda, tag) in [("1", "sampled"), ("0", "data")] {
        let (one, two) = (one.join(tag), two.join(tag));
        let args = [
            "--config",
            &cfg,
            "--init",
            pre.to_str().unwrap(),
            "--teacher",
            teacher.to_str().unwrap(),
            "--lmbda",
            lmbda,
            "--steps",
            "3",
            "--eval-every",
            "100",
            "--device",
            "cpu",
        ];
        one_rank_and_two(&["distill"], &args, &one, &two);
        let (x, y) = (losses(&one), losses(&two));
        assert_eq!(x.len(), 3, "{tag}");
        assert!(x.iter().all(|&(_, l)| l > 0.0), "{tag}: {x:?}");
        assert_same_curve(&x, &y);
    }
}

/// Over two launched ranks, a checkpoint that falls inside a rollout is taken there too: each
/// rank's share of the rollout is gathered into it (`rollout.rank-0` and `-1`), and the run
/// resumed from it on two ranks retraces the uninterrupted one exactly, for GRPO and for PPO
/// (whose shares hold the critic's values and returns), evaluations included. Resumed on one
/// rank, it cannot split the shares again: it says so, samples a new rollout, and trains on.
#[test]
fn rl_over_two_ranks_checkpoints_inside_a_rollout_and_resumes_exactly() {
    let d = tmp();
    let (cfg, pre) = pretrained(d.path());
    let base = std::fs::read_to_string(&cfg).unwrap();
    let pre = pre.to_str().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/varied_reward.py");
    let reward = format!("cmd:python3 {}", script.display());
    // Per rank: 4 rows a rollout in minibatches of 2, so two steps a rollout (PPO: two
    // epochs, four steps); the checkpoint at step 3 falls one step into a rollout.
    let tables = [
        ("grpo", "[grpo]\nprompts_per_rollout = 2\ngroup_size = 2\nminibatch_size = 2\neval_prompts = 4\nlog_completions = 0\nbeta = 0.04\n"),
        ("ppo", "[ppo]\nrollout_batch = 4\nminibatch_size = 2\nppo_epochs = 1\neval_prompts = 4\nlog_completions = 0\n"),
    ];
    for (stage, table) in tables {
        let c = p(d.path(), &format!("{stage}.toml"));
        std::fs::write(&c, format!("{base}\nkeep_checkpoints = 5\n{table}")).unwrap();
        let c = c.to_str().unwrap();
        let run = |out: &Path, every: &str| {
            run_ok(&[
                "launch",
                "--nproc-per-node",
                "2",
                "--",
                stage,
                "--config",
                c,
                "--init",
                pre,
                "--out",
                out.to_str().unwrap(),
                "--steps",
                "6",
                "--checkpoint-every",
                every,
                "--eval-every",
                "2",
                "--reward",
                &reward,
                "--device",
                "cpu",
            ]);
        };
        let (whole, cut) = (
            p(d.path(), &format!("{stage}-whole")),
            p(d.path(), &format!("{stage}-cut")),
        );
        run(&whole, "100");
        run(&cut, "3");
        let at3 = cut.join("checkpoints/step-0000003");
        for f in [
            "rollout.json",
            "rollout.rank-0.safetensors",
            "rollout.rank-1.safetensors",
        ] {
            assert!(at3.join(f).is_file(), "{stage}: {f}");
        }
        let one = p(d.path(), &format!("{stage}-one-rank"));
        copy_tree(&cut, &one);
        for run_dir in [&cut, &one] {
            std::fs::remove_dir_all(run_dir.join("checkpoints/step-0000006")).unwrap();
            std::fs::remove_dir_all(run_dir.join("final")).unwrap();
            std::fs::write(run_dir.join("checkpoints/latest"), "step-0000003").unwrap();
        }
        let cut_s = cut.to_str().unwrap();
        run_ok(&[
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            stage,
            "--resume",
            cut_s,
        ]);
        let x = losses(&whole);
        assert_eq!(x.len(), 6, "{x:?}");
        assert!(
            x.iter().any(|(_, l)| l.abs() > 1e-6),
            "{stage}: every loss is zero"
        );
        assert_eq!(losses(&cut), x, "{stage}: the resumed run left the curve");
        // The evaluation at step 4, after the resume and before the next rollout, reports the
        // KL of the rollout the checkpoint kept.
        let kl = |r: &Path| series(&metrics(r), "val", "rollout_kl");
        assert_eq!(kl(&whole).len(), 4, "{stage}");
        assert_eq!(kl(&cut), kl(&whole), "{stage}: evaluations");
        let o = run_ok(&[stage, "--resume", one.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("holds the rest of a rollout 2 rank(s) were training on, and this run has 1: the run samples a new rollout instead"),
            "{stage}: {err}"
        );
        assert!(
            err.contains(&format!(
                "resumed on 1 rank(s), where its checkpoint was trained on 2: \
                 [{stage}] minibatch_size and --grad-accum are per rank, so each step's global \
                 batch is now 2 (2 per rank x 1 accumulated x 1) where it was 4"
            )),
            "{stage}: {err}"
        );
        assert_eq!(losses(&one).len(), 6, "{stage}");
    }
}
