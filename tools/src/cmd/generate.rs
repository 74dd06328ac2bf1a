//! `swarm generate`: sample text from a checkpoint (ours, HF-format Llama, or llama2.c `.bin`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use serde::Serialize;

use super::eval::{load_model, tokenizer_for};
use crate::ui;

#[derive(clap::Args)]
pub(crate) struct GenerateArgs {
    /// A checkpoint directory (HF format) or a llama2.c `.bin`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Prompt text, tokenized with the checkpoint's tokenizer (byte-level for ours).
    #[arg(
        long,
        required_unless_present = "prompt_tokens",
        conflicts_with = "prompt_tokens"
    )]
    pub prompt: Option<String>,
    /// Prompt as token ids, comma-separated: for checkpoints without a tokenizer (llama2.c
    /// `.bin`); the output is then token ids too.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub prompt_tokens: Option<Vec<u32>>,
    /// Tokenizer (tokenizer.json) when the checkpoint has none.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct GenerateOut {
    prompt_tokens: Vec<u32>,
    tokens: Vec<u32>,
    /// The generated text (null when the checkpoint has no tokenizer).
    text: Option<String>,
}

pub(crate) fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0");
    }
    let (ck, model) = load_model(&args.checkpoint)?;
    let vocab = ck.config.vocab_size;
    let (prompt, tok) = match (&args.prompt, &args.prompt_tokens) {
        (_, Some(ids)) => {
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                bail!("prompt token {bad} is outside the vocabulary of {vocab}");
            }
            // Decode the output only if a tokenizer is known; ids alone are fine otherwise.
            (
                ids.clone(),
                tokenizer_for(&args.checkpoint, vocab, args.tokenizer.as_deref()).ok(),
            )
        }
        (Some(text), None) => {
            let tok = tokenizer_for(&args.checkpoint, vocab, args.tokenizer.as_deref())?;
            let ids = tok.encode(text);
            if ids.is_empty() {
                bail!("the prompt is empty");
            }
            (ids, Some(tok))
        }
        (None, None) => bail!("give --prompt or --prompt-tokens"),
    };
    // Stream human output as it is sampled; with --json only the final object is printed.
    let stream = !args.json && tok.is_some();
    if stream {
        print!("{}", args.prompt.as_deref().unwrap_or(""));
    }
    let mut pending = Vec::new();
    let tokens = model.generate(&prompt, args.max_tokens, args.temperature, args.seed, |t| {
        if let (true, Some(tok)) = (stream, &tok) {
            // Byte-level tokens may split a UTF-8 character: print once the bytes decode.
            pending.push(t);
            let s = tok.decode(&pending);
            if !s.ends_with('\u{FFFD}') || pending.len() >= 4 {
                print!("{s}");
                let _ = std::io::stdout().flush();
                pending.clear();
            }
        }
    })?;
    if stream {
        println!(
            "{}",
            tok.as_ref().map(|t| t.decode(&pending)).unwrap_or_default()
        );
    }
    let text = tok.as_ref().map(|t| t.decode(&tokens));
    if !stream && !args.json {
        let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    if args.json {
        ui::print_json(&GenerateOut {
            prompt_tokens: prompt,
            tokens,
            text,
        })?;
    }
    Ok(())
}
