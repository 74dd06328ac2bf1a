//! `swarm train --local`: the single-process reference run (issue #2). Without `--local` it
//! drives a distributed run (issue #6, `train_swarm.rs`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use swarm_model::train::load_corpus;
use swarm_model::{LocalTrainer, RunConfig, checkpoint};

use crate::ui;

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// Train in this process (the reference run); without it, train on a swarm.
    #[arg(long)]
    pub local: bool,
    /// Run config (TOML, see experiments/run.toml); default: the built-in default run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Training data (overrides `[data] path`): a text file or folder, or token shards from
    /// `swarm data prepare` (a folder with manifest.json, or llm.c .bin shards).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// HF tokenizer.json for text data (overrides `[data] tokenizer`); copied into the checkpoint.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model preset: 2m (the default shape), 20m, 100m or 1b. Sets the model, its stage split and
    /// micro-batch geometry; the vocabulary is the data's.
    #[arg(long)]
    pub model: Option<String>,
    /// Optimizer steps (overrides `[train] steps`; also the length of the LR schedule).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Checkpoint directory (HF format + optimizer state). If it holds a checkpoint with
    /// training state, the run resumes from it exactly.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Options of the distributed run (without `--local`).
    #[command(flatten)]
    pub swarm: super::train_swarm::SwarmFlags,
}

#[derive(Serialize)]
struct Summary {
    steps: u64,
    tokens: u64,
    initial_loss: Option<f64>,
    final_loss: Option<f64>,
    val_loss: f64,
    tokens_per_s: f64,
    wall_s: f64,
    /// CPU seconds (user + system, all threads) the training loop used: with `swarm demo`'s
    /// `cpu.total_s`, what the swarm's machinery costs over the same compute.
    cpu_s: f64,
}

pub(crate) fn run(args: TrainArgs) -> anyhow::Result<()> {
    short_candle_spin();
    if !args.local {
        return super::train_swarm::run_cli(&args);
    }
    let mut cfg = match &args.config {
        Some(p) => RunConfig::from_file(p)?,
        None => RunConfig::default(),
    };
    if let Some(s) = args.steps {
        cfg.train.steps = s;
    }
    apply_overrides(
        &mut cfg,
        args.data.as_ref(),
        args.tokenizer.as_ref(),
        args.model.as_deref(),
    )?;

    let corpus = load_corpus(&cfg.data).context("loading training data")?;
    if corpus.vocab_size() > cfg.model.vocab_size {
        bail!(
            "the tokenizer has {} ids but model.vocab_size is {}",
            corpus.vocab_size(),
            cfg.model.vocab_size
        );
    }

    let mut trainer = match &args.out {
        Some(dir) if dir.join(checkpoint::STATE_FILE).exists() => {
            let ck = checkpoint::load(dir)
                .with_context(|| format!("resuming from {}", dir.display()))?;
            let (model, tensors) = ck.trained_model();
            if *model != cfg.model {
                bail!(
                    "{} holds a different model than the run config",
                    dir.display()
                );
            }
            let t = LocalTrainer::from_tensors(&cfg, &tensors, ck.state.as_ref())?;
            if !args.json {
                eprintln!("resuming from {} at step {}", dir.display(), t.step());
            }
            t
        }
        _ => LocalTrainer::new(&cfg)?,
    };

    let t = &cfg.train;
    let params = cfg.model.num_parameters();
    if !args.json {
        println!(
            "model: {params} parameters, {} layers in stages {:?}; data: {} ({} train tokens); \
             {} tokens/step",
            cfg.model.num_hidden_layers,
            cfg.stages,
            corpus.source(),
            corpus.train_len(),
            cfg.tokens_per_step()
        );
    }
    let save = |trainer: &LocalTrainer| -> anyhow::Result<()> {
        if let Some(dir) = &args.out {
            checkpoint::save_with_tokenizer(
                dir,
                &cfg.model,
                &trainer.tensors(),
                Some(&trainer.train_state()?),
                cfg.data.tokenizer.as_deref(),
            )
            .with_context(|| format!("saving checkpoint to {}", dir.display()))?;
        }
        Ok(())
    };

    let bar = ui::progress(t.steps, args.json);
    bar.set_position(trainer.step().min(t.steps));
    let start = Instant::now();
    let cpu = crate::procfs::CpuSpan::start(&[]);
    let (mut initial_loss, mut final_loss) = (None, None);
    let mut tokens: u64 = 0;
    while trainer.step() < t.steps {
        let s = trainer.train_step(&corpus)?;
        tokens += s.tokens as u64;
        initial_loss.get_or_insert(s.loss);
        final_loss = Some(s.loss);
        let done = s.step + 1;
        let tps = tokens as f64 / start.elapsed().as_secs_f64();
        bar.set_position(done);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            s.loss, s.lr, tps
        ));
        tracing::debug!(
            step = s.step,
            loss = s.loss,
            lr = s.lr,
            grad_norm = s.grad_norm,
            "step"
        );
        if t.eval_every > 0 && done % t.eval_every == 0 && done < t.steps {
            let v = trainer.eval(&corpus, t.eval_batches)?;
            tracing::info!(step = done, val_loss = v, "eval");
            if !args.json {
                let line = format!("step {done:>6}: train loss {:.4}, val loss {v:.4}", s.loss);
                // A hidden bar (stderr not a terminal) drops println: print the line directly.
                if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
            }
        }
        if t.checkpoint_every > 0 && done % t.checkpoint_every == 0 && done < t.steps {
            save(&trainer)?;
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu_s = cpu.used(&[]).own_s;
    bar.finish_and_clear();
    let v = trainer.eval(&corpus, t.eval_batches)?;
    save(&trainer)?;

    let summary = Summary {
        steps: trainer.step(),
        tokens,
        initial_loss,
        final_loss,
        val_loss: v,
        tokens_per_s: if wall > 0.0 {
            tokens as f64 / wall
        } else {
            0.0
        },
        wall_s: wall,
        cpu_s,
    };
    if args.json {
        ui::print_json(&summary)?;
    } else {
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.4}"));
        println!(
            "trained to step {}: {} tokens in {:.1} s ({:.0} tokens/s, {:.1} CPU s); train loss {} -> {}; \
             val loss {:.4} nats/token{}",
            summary.steps,
            summary.tokens,
            summary.wall_s,
            summary.tokens_per_s,
            summary.cpu_s,
            fmt(initial_loss),
            fmt(final_loss),
            summary.val_loss,
            args.out.as_ref().map_or(String::new(), |d| format!(
                "; checkpoint in {}",
                d.display()
            ))
        );
    }
    Ok(())
}

/// Applies `--data`, `--tokenizer` and `--model` to a run config, then validates it. A preset
/// takes its vocabulary from the data (the tokenizer's, or a dataset's manifest; bytes otherwise).
pub(crate) fn apply_overrides(
    cfg: &mut RunConfig,
    data: Option<&PathBuf>,
    tokenizer: Option<&PathBuf>,
    model: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(d) = data {
        cfg.data.path = Some(d.clone());
    }
    if let Some(t) = tokenizer {
        cfg.data.tokenizer = Some(t.clone());
    }
    if let Some(name) = model {
        let vocab = swarm_model::train::data_vocab_size(&cfg.data)?;
        swarm_model::presets::preset(name)?.apply(cfg, vocab)?;
    }
    cfg.validate()?;
    Ok(())
}

/// candle's CPU worker pool spins for a long time between ops before parking. On a busy machine
/// (more runnable threads than cores) the spinning workers steal the cores the real work needs:
/// measured here with ~6 engineers sharing 2 cores, backward took 1.27 s per micro-batch with
/// the default and 0.90 s with a short spin. Unless the user chose a value, use a short spin.
/// Candle reads the variable when it creates its pool, and setting it in-process needs an
/// `unsafe` `set_var` that is unsound once other threads exist (the signal thread already does):
/// so the command re-executes itself (same pid, arguments and descriptors) with the variable set.
/// Called first thing, before any candle op creates the pool and before any output.
pub(crate) fn short_candle_spin() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VAR, "50")
        .exec();
    tracing::debug!(error = %err, "no re-execution with a short candle spin; keeping the default");
}
