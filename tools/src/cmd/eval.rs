//! `swarm eval`: mean next-token loss of a checkpoint on tokens or text, and the last-position
//! logits. Accepts our checkpoints, HF-format Llama directories and llama2.c `.bin` files.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;
use swarm_model::checkpoint::{self, Checkpoint};
use swarm_model::checkpoint_eval::Evaluator;
use swarm_model::data::VAL_FRACTION;
use swarm_model::{ByteTokenizer, Corpus, Tokenizer};

use crate::ui;

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    /// A checkpoint directory (HF format: config.json + model.safetensors) or a llama2.c `.bin`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Token ids to score, comma-separated: prints their loss and the logits after the last one.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "data", required_unless_present = "data")]
    pub tokens: Option<Vec<u32>>,
    /// Text to score: a file, a folder of files, or `builtin` (the built-in corpus's held-out split).
    #[arg(long)]
    pub data: Option<String>,
    /// Tokenizer for `--data` (a tokenizer.json); default: the checkpoint's, else byte-level
    /// when the vocabulary has 256 entries.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Window length for `--data` (capped by the model's context).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Windows per forward pass for `--data`.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct EvalOut {
    checkpoint: String,
    /// Mean next-token loss in nats (null when fewer than two tokens were given).
    loss: Option<f64>,
    /// Predicted tokens the loss averages over.
    tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_logits: Option<Vec<f32>>,
}

/// Loads any supported checkpoint and builds the model.
pub(crate) fn load_model(path: &Path) -> anyhow::Result<(Checkpoint, Evaluator)> {
    let ck = checkpoint::load_any(path)
        .with_context(|| format!("loading checkpoint {}", path.display()))?;
    let model = Evaluator::from_checkpoint(&ck).context("building the model")?;
    Ok((ck, model))
}

/// The tokenizer to use with a checkpoint, or an error saying what is possible.
pub(crate) fn tokenizer_for(
    checkpoint: &Path,
    vocab_size: usize,
    explicit: Option<&Path>,
) -> anyhow::Result<Box<dyn Tokenizer>> {
    let found = explicit.map(Path::to_path_buf).or_else(|| {
        let p = checkpoint.join("tokenizer.json");
        (checkpoint.is_dir() && p.exists()).then_some(p)
    });
    let tok: Box<dyn Tokenizer> = match found {
        Some(p) => swarm_model::tokenizer::load_tokenizer(&p)
            .with_context(|| format!("loading tokenizer {}", p.display()))?,
        None if vocab_size == 256 => Box::new(ByteTokenizer),
        None => bail!(
            "{} has no tokenizer (vocabulary of {vocab_size}, not byte-level): pass --tokenizer \
             tokenizer.json, or give token ids (`eval --tokens`, `generate --prompt-tokens`)",
            checkpoint.display()
        ),
    };
    if tok.vocab_size() > vocab_size {
        bail!(
            "tokenizer {} has {} tokens, more than the model's {vocab_size}",
            tok.name(),
            tok.vocab_size()
        );
    }
    Ok(tok)
}

pub(crate) fn run(args: EvalArgs) -> anyhow::Result<()> {
    let (ck, model) = load_model(&args.checkpoint)?;
    let vocab = ck.config.vocab_size;
    let out = if let Some(tokens) = &args.tokens {
        if tokens.is_empty() {
            bail!("--tokens needs at least one token id");
        }
        let loss = model.sequence_loss(tokens)?;
        let last = model.last_logits(tokens)?;
        EvalOut {
            checkpoint: args.checkpoint.display().to_string(),
            loss,
            tokens: tokens.len() - 1,
            last_logits: Some(last),
        }
    } else {
        let data = args
            .data
            .as_deref()
            .expect("clap requires --tokens or --data");
        let tokens: Vec<u32> = if data == "builtin" {
            if vocab < 256 {
                bail!("the built-in corpus is byte-level (256 tokens); this model has {vocab}");
            }
            Corpus::builtin().val_tokens()?
        } else if swarm_model::data::is_token_dataset(Path::new(data)) {
            // A dataset of shards: its validation split (held-out shards or tail).
            let corpus = Corpus::from_path(Path::new(data), &ByteTokenizer, VAL_FRACTION)?;
            if corpus.vocab_size() > vocab {
                bail!(
                    "{data} has ids up to {}, more than the model's vocabulary of {vocab}",
                    corpus.vocab_size()
                );
            }
            corpus.val_tokens()?
        } else {
            let tok = tokenizer_for(&args.checkpoint, vocab, args.tokenizer.as_deref())?;
            let corpus = Corpus::from_path(Path::new(data), tok.as_ref(), VAL_FRACTION)?;
            let mut all = corpus.read_train(0, corpus.train_len() as usize)?;
            all.extend(corpus.val_tokens()?);
            all
        };
        let bar = ui::progress(tokens.len().saturating_sub(1) as u64, args.json);
        bar.set_message("tokens");
        let s = model.stream_loss(&tokens, args.seq_len, args.batch_size, |done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        EvalOut {
            checkpoint: args.checkpoint.display().to_string(),
            loss: Some(s.loss),
            tokens: s.tokens,
            last_logits: None,
        }
    };
    match out.loss {
        Some(l) => println!(
            "loss {l:.6} nats over {} tokens ({:.4} bits/token)",
            out.tokens,
            l / std::f64::consts::LN_2
        ),
        None => println!("loss: undefined (a single token has nothing to predict)"),
    }
    if let Some(l) = &out.last_logits {
        let (best, val) =
            l.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            );
        println!(
            "last-position logits: {} values, argmax token {best} ({val:.4})",
            l.len()
        );
    }
    if args.json {
        ui::print_json(&out)?;
    }
    Ok(())
}
