//! `swarm data prepare`: tokenize text, folders and JSONL once into memory-mappable token shards
//! (the work is `swarm_model::prepare`; this shows progress and prints the summary).

use std::path::PathBuf;

use swarm_model::prepare::{PrepareOptions, prepare};

use crate::ui;

#[derive(clap::Subcommand)]
pub(crate) enum DataCommand {
    /// Tokenize text files, folders and JSONL (`text` field) into token shards + manifest.json.
    Prepare(PrepareArgs),
}

#[derive(clap::Args)]
pub(crate) struct PrepareArgs {
    /// Text files, folders of them, and `.jsonl` files (one document per line, in `text`).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The HF tokenizer.json to tokenize with (copied beside checkpoints of runs on the data).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output folder (shards and manifest.json); running again with the same inputs resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokenizing threads (default: the available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Training shards are cut after about this many tokens.
    #[arg(long, default_value_t = 100_000_000)]
    pub shard_tokens: u64,
    /// Fraction of the input (its start) held out as validation shards; 0 for none.
    #[arg(long, default_value_t = 0.01)]
    pub val_fraction: f64,
    /// End-of-document token id (default: the tokenizer's <|endoftext|> or </s>).
    #[arg(long)]
    pub eot: Option<u32>,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Prepare(a) => run_prepare(a),
    }
}

fn run_prepare(args: PrepareArgs) -> anyhow::Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let opts = PrepareOptions {
        inputs: args.inputs,
        tokenizer: args.tokenizer,
        out: args.out,
        threads,
        shard_tokens: args.shard_tokens,
        val_fraction: args.val_fraction,
        end_of_document: args.eot,
        chunk_bytes: swarm_model::prepare::CHUNK_BYTES,
    };
    let bar = ui::progress(1, args.json);
    bar.set_message("MB");
    let s = prepare(&opts, |done, total| {
        bar.set_length(total.max(1) / 1_000_000 + 1);
        bar.set_position(done / 1_000_000);
    })?;
    bar.finish_and_clear();
    if args.json {
        return ui::print_json(&s);
    }
    println!(
        "{}: {} documents, {:.1} MB -> {} tokens ({} train, {} val) in {} shards; {:.1} s, \
         {:.2} MB/s ({:.2} MB/s per core, {} threads){}",
        s.out,
        s.documents,
        s.bytes as f64 / 1e6,
        s.tokens,
        s.train_tokens,
        s.val_tokens,
        s.shards,
        s.wall_s,
        s.mb_per_s,
        s.mb_per_s_per_core,
        s.threads,
        if s.resumed_chunks > 0 {
            format!("; resumed after {} chunks", s.resumed_chunks)
        } else {
            String::new()
        }
    );
    Ok(())
}
