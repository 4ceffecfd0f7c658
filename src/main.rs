use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;

use temper::cli::{Cli, Command, EvalArgs, ExportArgs, GenerateArgs, StageArgs, TokenizerCmd};
use temper::config::Stage;
use temper::data::records::load_prompts;
use temper::data::tokenizer::train_bpe;
use temper::generate::{generate, SampleCfg};
use temper::kernels::KernelSet;
use temper::model::linear::Ctx;
use temper::stages::loader::{policy_from, read_checkpoint};
use temper::stages::{self, Env};
use temper::train::params::ParamStore;
use temper::train::rng::Rng;

fn main() -> ExitCode {
    // A bug should still end with one readable line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    // candle's CPU thread pool spins at every barrier; on a small or shared machine (CI, a
    // laptop running other work) that costs more than the parallelism gains, so CPU runs use
    // one thread unless CANDLE_NUM_THREADS says otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stage_env(args: &StageArgs, stage: Stage) -> Result<Env> {
    let (cfg, out, resume) = args.resolve(stage)?;
    Env::prepare(cfg, &out, resume)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pretrain(a) => {
            let r = stages::pretrain::run(&stage_env(&a, Stage::Pretrain)?)?;
            println!(
                "pretrain: val loss {:.4} (perplexity {:.2})",
                r.val_loss,
                r.val_loss.exp()
            );
        }
        Command::Sft(a) => {
            let r = stages::sft::run(&stage_env(&a, Stage::Sft)?)?;
            println!("sft: held-out loss {:.4}", r.eval_loss);
            if let (Some(b), Some(acc)) = (r.base_accuracy, r.accuracy) {
                println!("sft: accuracy {acc:.3} (base model {b:.3})");
            }
        }
        Command::Reward(a) => {
            let r = stages::reward::run(&stage_env(&a, Stage::Reward)?)?;
            println!("reward: held-out pairwise accuracy {:.3}", r.accuracy);
        }
        Command::Ppo(a) => {
            let r = stages::ppo::run(&stage_env(&a, Stage::Ppo)?)?;
            println!("{}", r.describe());
        }
        Command::Dpo(a) => {
            let r = stages::dpo::run(&stage_env(&a, Stage::Dpo)?)?;
            println!("{}", r.describe());
        }
        Command::Grpo(a) => {
            let r = stages::grpo::run(&stage_env(&a, Stage::Grpo)?)?;
            println!("{}", r.describe());
        }
        Command::Pipeline(a) => stages::pipeline::run(&a.options())?,
        Command::Generate(a) => generate_cmd(&a)?,
        Command::Eval(a) => eval_cmd(&a)?,
        Command::Export(a) => export_cmd(&a)?,
        Command::Tokenizer(TokenizerCmd::Train {
            files,
            vocab_size,
            out,
        }) => {
            let t = train_bpe(&files, vocab_size, &out)?;
            println!("wrote {} ({})", out.display(), t.describe());
        }
    }
    Ok(())
}

fn generate_cmd(a: &GenerateArgs) -> Result<()> {
    let device = temper::device::select(a.device)?;
    let loaded = read_checkpoint(&a.checkpoint, &device)?;
    let mut store = ParamStore::new(device.clone(), 0);
    let net = policy_from(&loaded, &mut store, None)?;
    let tok = &loaded.tokenizer;
    let mut prompts = a.prompt.clone();
    if let Some(p) = &a.prompts {
        prompts.extend(load_prompts(p)?.into_iter().map(|r| r.prompt));
    }
    if prompts.is_empty() {
        bail!("generate: give --prompt TEXT or --prompts FILE.jsonl");
    }
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_>>()?;
    let cfg = SampleCfg {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        stop: a.stop.clone(),
    };
    let ctx = Ctx {
        dtype: temper::device::compute_dtype(Default::default(), &device),
        kernels: KernelSet::default().apply_spec(&a.kernels)?,
        use_lora: false,
        dropout_seed: None,
    };
    let g = generate(&net, ctx, tok, &ids, &cfg, &mut Rng::new(a.seed))?;
    for (p, t) in prompts.iter().zip(&g.texts) {
        println!("{}", serde_json::json!({"prompt": p, "completion": t}));
    }
    Ok(())
}

fn eval_cmd(a: &EvalArgs) -> Result<()> {
    let device = temper::device::select(a.device)?;
    let loaded = read_checkpoint(&a.checkpoint, &device)?;
    let mut store = ParamStore::new(device.clone(), 0);
    let net = policy_from(&loaded, &mut store, None)?;
    let prompts = match &a.prompts {
        Some(p) => load_prompts(p)?,
        None => temper::data::synthetic::Synthetic::new(a.task_seed)
            .prompts(temper::data::synthetic::Split::Eval, usize::MAX),
    };
    let ctx = Ctx {
        dtype: temper::device::compute_dtype(Default::default(), &device),
        kernels: KernelSet::default(),
        use_lora: false,
        dropout_seed: None,
    };
    let r = stages::eval::accuracy(&net, ctx, &loaded.tokenizer, &prompts, a.max_new_tokens, 64)?;
    for (p, t, ok) in &r.samples {
        eprintln!("{} {:?} -> {:?}", if *ok { "ok " } else { "bad" }, p, t);
    }
    println!("{}", serde_json::json!({"accuracy": r.accuracy, "n": r.n}));
    Ok(())
}

fn export_cmd(a: &ExportArgs) -> Result<()> {
    stages::export::export(&a.checkpoint, &a.out, a.format)?;
    println!("wrote {} ({:?})", a.out.display(), a.format);
    Ok(())
}
