//! `swarm data prepare`: text files, folders and JSONL (`text` field) tokenized once into token
//! shards (see [`crate::shards`]), in parallel and in bounded memory, resumable.
//!
//! The input is cut deterministically into segments (a JSONL record, or at most [`SEGMENT_BYTES`]
//! of a text file cut after a newline) and segments into work chunks of about [`CHUNK_BYTES`];
//! worker threads tokenize chunks, and the writer appends them in input order, with the
//! end-of-document token after each document, so the output does not depend on the thread count.
//! In flight are at most a few chunks per thread: memory is bounded whatever the corpus size.
//!
//! The first `val_fraction` of the input bytes (whole segments) is the validation split, written
//! to its own shards; the rest is the training split, cut into shards of about `shard_tokens`.
//! After each finished shard the manifest records how many chunks are done, so an interrupted run
//! started again with the same options skips them (unfinished shards are `.tmp` files, removed).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::shards::{
    Dtype, FORMAT, MANIFEST, Manifest, ShardEntry, ShardWriter, Split, TokenizerInfo, VERSION, hex,
    tokenizer_hash,
};
use crate::tokenizer::{Tokenizer, tokenizer_file};
use crate::tokenizer_bpe::{BpeTokenizer, WordCache};

/// Largest piece of a text file tokenized as one unit (cut after a newline when there is one).
pub const SEGMENT_BYTES: usize = 64 << 10;
/// Text per work chunk by default (shards are cut at chunk ends).
pub const CHUNK_BYTES: usize = 4 << 20;
/// Longest JSONL line we accept.
pub const MAX_LINE_BYTES: usize = 256 << 20;

/// What to prepare and how.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Text files, folders of them (recursively, sorted, hidden files skipped) and `.jsonl` files.
    pub inputs: Vec<PathBuf>,
    /// A HF tokenizer.json (or a folder holding one).
    pub tokenizer: PathBuf,
    /// The dataset folder to write.
    pub out: PathBuf,
    /// Tokenizing threads.
    pub threads: usize,
    /// Training shards are cut after about this many tokens.
    pub shard_tokens: u64,
    /// Fraction of the input bytes (from the start) held out as the validation split; 0: none.
    pub val_fraction: f64,
    /// End-of-document token (default: the tokenizer's `<|endoftext|>`, `</s>`, ...).
    pub end_of_document: Option<u32>,
    /// Text per work chunk ([`CHUNK_BYTES`]); shards end at chunk ends.
    pub chunk_bytes: usize,
}

/// What a prepare run did.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareSummary {
    /// The dataset folder.
    pub out: String,
    /// Input files read.
    pub files: usize,
    /// Documents tokenized.
    pub documents: u64,
    /// Input bytes.
    pub bytes: u64,
    /// Tokens written.
    pub tokens: u64,
    /// Tokens in the training split.
    pub train_tokens: u64,
    /// Tokens in the validation split.
    pub val_tokens: u64,
    /// Shard files written.
    pub shards: usize,
    /// Chunks skipped because an earlier run had written them.
    pub resumed_chunks: u64,
    /// Tokenizing threads used.
    pub threads: usize,
    /// Wall seconds.
    pub wall_s: f64,
    /// Process CPU seconds (user + system) spent.
    pub cpu_s: f64,
    /// Input MB (10^6 bytes) tokenized per wall second, and per CPU second (per core).
    pub mb_per_s: f64,
    /// Input MB tokenized per CPU second.
    pub mb_per_s_per_core: f64,
    /// Input bytes per token (the tokenizer's compression).
    pub bytes_per_token: f64,
}

/// Resume bookkeeping, kept in the manifest while a dataset is being made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// Hash of the options and input files (names, sizes, modification times).
    pub job: String,
    /// Chunks whose tokens are in finished shards.
    pub chunks_done: u64,
    /// Every chunk is in a finished shard.
    pub complete: bool,
}

struct Segment {
    text: String,
    end_of_document: bool,
}

struct Chunk {
    index: u64,
    split: Split,
    bytes: u64,
    segments: Vec<Segment>,
}

struct Done {
    index: u64,
    split: Split,
    bytes: u64,
    documents: u64,
    tokens: Vec<u32>,
}

/// Files to read, in order.
fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut f = Vec::new();
            crate::data::collect_files(p, &mut f)?;
            f.sort();
            files.extend(f);
        } else {
            std::fs::metadata(p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err(Error::Data("no input files".into()));
    }
    Ok(files)
}

fn is_jsonl(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "jsonl")
}

/// Reads the inputs as segments, in order, calling `emit(segment, bytes)`; stops early if `emit`
/// returns false.
fn read_segments(
    files: &[PathBuf],
    mut emit: impl FnMut(Segment, u64) -> bool,
) -> Result<(), Error> {
    for f in files {
        let io = |source| Error::Io {
            path: f.clone(),
            source,
        };
        let file = std::fs::File::open(f).map_err(io)?;
        if is_jsonl(f) {
            let mut r = BufReader::with_capacity(1 << 20, file);
            let mut line = Vec::new();
            for n in 1.. {
                line.clear();
                let got = (&mut r)
                    .take(MAX_LINE_BYTES as u64 + 1)
                    .read_until(b'\n', &mut line)
                    .map_err(io)?;
                if got == 0 {
                    break;
                }
                if line.len() > MAX_LINE_BYTES {
                    return Err(Error::Data(format!(
                        "{}:{n}: line longer than {MAX_LINE_BYTES} bytes",
                        f.display()
                    )));
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                #[derive(Deserialize)]
                struct Rec {
                    text: String,
                }
                let rec: Rec = serde_json::from_slice(&line).map_err(|e| {
                    Error::Data(format!(
                        "{}:{n}: not a JSON object with a text field: {e}",
                        f.display()
                    ))
                })?;
                if !emit(
                    Segment {
                        text: rec.text,
                        end_of_document: true,
                    },
                    got as u64,
                ) {
                    return Ok(());
                }
            }
        } else {
            let mut r = BufReader::with_capacity(1 << 20, file);
            let mut carry: Vec<u8> = Vec::new();
            let mut buf = vec![0u8; SEGMENT_BYTES];
            loop {
                let n = r
                    .read(&mut buf[..SEGMENT_BYTES - carry.len().min(SEGMENT_BYTES / 2)])
                    .map_err(io)?;
                carry.extend_from_slice(&buf[..n]);
                let eof = n == 0;
                if carry.is_empty() {
                    break;
                }
                if !eof && carry.len() < SEGMENT_BYTES / 2 {
                    continue;
                }
                // Cut after the last newline (else at a character boundary) unless at the end.
                let cut = if eof {
                    carry.len()
                } else {
                    match carry.iter().rposition(|&b| b == b'\n') {
                        Some(i) => i + 1,
                        None => (0..=carry.len().min(4))
                            .map(|k| carry.len() - k)
                            .find(|&c| std::str::from_utf8(&carry[..c]).is_ok() || c == 0)
                            .filter(|&c| c > 0)
                            .unwrap_or(carry.len()),
                    }
                };
                let rest = carry.split_off(cut);
                let bytes = carry.len() as u64;
                let text = String::from_utf8(std::mem::replace(&mut carry, rest))
                    .map_err(|e| Error::Data(format!("{}: not UTF-8 text: {e}", f.display())))?;
                let last = eof && carry.is_empty();
                if !emit(
                    Segment {
                        text,
                        end_of_document: last,
                    },
                    bytes,
                ) {
                    return Ok(());
                }
                if last {
                    break;
                }
            }
        }
    }
    Ok(())
}

fn job_hash(
    opts: &PrepareOptions,
    files: &[PathBuf],
    tok_hash: &[u8; 32],
    eot: u32,
) -> Result<String, Error> {
    let mut h = blake3::Hasher::new();
    h.update(tok_hash);
    h.update(&opts.shard_tokens.to_le_bytes());
    h.update(&opts.val_fraction.to_le_bytes());
    h.update(&eot.to_le_bytes());
    h.update(&(SEGMENT_BYTES as u64).to_le_bytes());
    h.update(&(opts.chunk_bytes as u64).to_le_bytes());
    for f in files {
        let m = std::fs::metadata(f).map_err(|source| Error::Io {
            path: f.clone(),
            source,
        })?;
        h.update(f.to_string_lossy().as_bytes());
        h.update(&m.len().to_le_bytes());
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.update(&mtime.to_le_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Process CPU seconds (user + system) from `/proc/self/stat`; 0 where unavailable.
pub fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the stat line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Tokenizes the inputs into shards under `opts.out`; `progress(bytes_done, bytes_total)` is
/// called as chunks are written.
pub fn prepare(
    opts: &PrepareOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<PrepareSummary, Error> {
    let start = Instant::now();
    let cpu0 = process_cpu_seconds();
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::Data(format!(
            "validation fraction {} must be in [0, 1)",
            opts.val_fraction
        )));
    }
    if opts.shard_tokens == 0 || opts.threads == 0 {
        return Err(Error::Data(
            "shard_tokens and threads must be positive".into(),
        ));
    }
    let tok_path = tokenizer_file(&opts.tokenizer);
    let tok_bytes = std::fs::read(&tok_path).map_err(|source| Error::Io {
        path: tok_path.clone(),
        source,
    })?;
    let tok = Arc::new(BpeTokenizer::from_json(&tok_bytes)?);
    let vocab = tok.vocab_size();
    let eot = match opts.end_of_document.or_else(|| tok.end_of_document()) {
        Some(e) if (e as usize) < vocab => e,
        Some(e) => {
            return Err(Error::Data(format!(
                "end-of-document token {e} outside the vocabulary of {vocab}"
            )));
        }
        None => {
            return Err(Error::Data(
                "the tokenizer has no end-of-document token (<|endoftext|>, </s>): give one".into(),
            ));
        }
    };
    let dtype = Dtype::for_vocab(vocab);
    let thash = tokenizer_hash(&tok_bytes);
    let files = input_files(&opts.inputs)?;
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let job = job_hash(opts, &files, &thash, eot)?;
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.clone(),
        source,
    })?;

    // Resume: keep the shards an earlier run of the same job finished.
    let mut manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        tokenizer: TokenizerInfo {
            name: tok.name().into(),
            hash: hex(thash),
            vocab_size: vocab,
        },
        end_of_document: eot,
        dtype,
        shards: Vec::new(),
        progress: Some(Progress {
            job: job.clone(),
            chunks_done: 0,
            complete: false,
        }),
    };
    if out.join(MANIFEST).exists() {
        let old = Manifest::read_any(out)?;
        match &old.progress {
            Some(p) if p.job == job && old.tokenizer == manifest.tokenizer => {
                if p.complete {
                    return Err(Error::Data(format!(
                        "{} already holds this dataset, complete",
                        out.display()
                    )));
                }
                manifest.shards = old.shards.clone();
                manifest.progress = old.progress.clone();
            }
            _ => {
                return Err(Error::Data(format!(
                    "{} holds another dataset (other inputs or options): choose another --out",
                    out.display()
                )));
            }
        }
    }
    for e in std::fs::read_dir(out).map_err(|source| Error::Io {
        path: out.clone(),
        source,
    })? {
        let p = e
            .map_err(|source| Error::Io {
                path: out.clone(),
                source,
            })?
            .path();
        if p.extension().is_some_and(|x| x == "tmp") {
            let _ = std::fs::remove_file(&p);
        }
    }
    let skip = manifest.progress.as_ref().map_or(0, |p| p.chunks_done);

    let threads = opts.threads;
    let (work_tx, work_rx) = sync_channel::<Chunk>(2 * threads);
    let work_rx = Arc::new(std::sync::Mutex::new(work_rx));
    let (done_tx, done_rx) = sync_channel::<Result<Done, Error>>(2 * threads);
    let val_bytes = (total as f64 * opts.val_fraction) as u64;
    let chunk_bytes = opts.chunk_bytes.max(1);

    std::thread::scope(|scope| -> Result<PrepareSummary, Error> {
        // Reader: segments into chunks; the split changes only at a chunk boundary.
        let reader_done = done_tx.clone();
        let files_ref = &files;
        scope.spawn(move || {
            let mut index = 0u64;
            let mut read = 0u64;
            let mut chunk = Chunk {
                index: 0,
                split: Split::Val,
                bytes: 0,
                segments: Vec::new(),
            };
            let send = |c: Chunk, tx: &SyncSender<Chunk>| -> bool {
                if c.index < skip {
                    // Done by an earlier run: only its place in the numbering matters.
                    return reader_done
                        .send(Ok(Done {
                            index: c.index,
                            split: c.split,
                            bytes: c.bytes,
                            documents: 0,
                            tokens: Vec::new(),
                        }))
                        .is_ok();
                }
                tx.send(c).is_ok()
            };
            let r = read_segments(files_ref, |seg, bytes| {
                let split = if read < val_bytes {
                    Split::Val
                } else {
                    Split::Train
                };
                read += bytes;
                if (split != chunk.split || chunk.bytes as usize >= chunk_bytes)
                    && !chunk.segments.is_empty()
                {
                    let next = Chunk {
                        index: index + 1,
                        split,
                        bytes: 0,
                        segments: Vec::new(),
                    };
                    index += 1;
                    if !send(std::mem::replace(&mut chunk, next), &work_tx) {
                        return false;
                    }
                }
                chunk.split = split;
                chunk.bytes += bytes;
                chunk.segments.push(seg);
                true
            });
            match r {
                Ok(()) if !chunk.segments.is_empty() => {
                    send(chunk, &work_tx);
                }
                Ok(()) => {}
                Err(e) => {
                    let _ = reader_done.send(Err(e));
                }
            }
            drop(work_tx);
        });
        // Workers.
        for _ in 0..threads {
            let rx = work_rx.clone();
            let tx = done_tx.clone();
            let tok = tok.clone();
            scope.spawn(move || {
                let mut cache = WordCache::default();
                loop {
                    let next = rx.lock().map(|r| r.recv());
                    let Ok(Ok(c)) = next else { break };
                    let mut tokens = Vec::with_capacity(c.bytes as usize / 3);
                    let mut documents = 0;
                    for s in &c.segments {
                        tokens.extend(tok.encode_cached(&s.text, &mut cache));
                        if s.end_of_document {
                            tokens.push(eot);
                            documents += 1;
                        }
                    }
                    let done = Done {
                        index: c.index,
                        split: c.split,
                        bytes: c.bytes,
                        documents,
                        tokens,
                    };
                    if tx.send(Ok(done)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        write_in_order(
            done_rx,
            opts,
            &mut manifest,
            skip,
            total,
            dtype,
            vocab as u32,
            thash,
            &mut progress,
        )
        .map(|w| {
            let wall = start.elapsed().as_secs_f64();
            let cpu = (process_cpu_seconds() - cpu0).max(1e-9);
            let mb = w.bytes as f64 / 1e6;
            PrepareSummary {
                out: out.display().to_string(),
                files: files.len(),
                documents: w.documents,
                bytes: w.bytes,
                tokens: w.train + w.val,
                train_tokens: w.train,
                val_tokens: w.val,
                shards: manifest.shards.len(),
                resumed_chunks: skip,
                threads,
                wall_s: wall,
                cpu_s: cpu,
                mb_per_s: mb / wall.max(1e-9),
                mb_per_s_per_core: mb / cpu,
                bytes_per_token: w.bytes as f64 / (w.train + w.val).max(1) as f64,
            }
        })
    })
}

struct Written {
    bytes: u64,
    documents: u64,
    train: u64,
    val: u64,
}

#[allow(clippy::too_many_arguments)]
fn write_in_order(
    done_rx: Receiver<Result<Done, Error>>,
    opts: &PrepareOptions,
    manifest: &mut Manifest,
    skip: u64,
    total: u64,
    dtype: Dtype,
    vocab: u32,
    thash: [u8; 32],
    progress: &mut impl FnMut(u64, u64),
) -> Result<Written, Error> {
    let out = &opts.out;
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut w = Written {
        bytes: 0,
        documents: 0,
        train: manifest
            .shards
            .iter()
            .filter(|s| s.split == Split::Train)
            .map(|s| s.tokens)
            .sum(),
        val: manifest
            .shards
            .iter()
            .filter(|s| s.split == Split::Val)
            .map(|s| s.tokens)
            .sum(),
    };
    let mut open: Option<(ShardWriter, Split, String)> = None;
    let finish = |open: &mut Option<(ShardWriter, Split, String)>,
                  manifest: &mut Manifest,
                  chunks_done: u64|
     -> Result<(), Error> {
        if let Some((wr, split, file)) = open.take() {
            let tokens = wr.finish()?;
            manifest.shards.push(ShardEntry {
                file,
                tokens,
                split,
            });
            if let Some(p) = &mut manifest.progress {
                p.chunks_done = chunks_done;
            }
            manifest.write(out)?;
        }
        Ok(())
    };
    for d in done_rx.iter() {
        let d = d?;
        pending.insert(d.index, d);
        while let Some(d) = pending.remove(&next) {
            next += 1;
            w.bytes += d.bytes;
            progress(w.bytes, total);
            if d.index < skip {
                continue;
            }
            w.documents += d.documents;
            if open.as_ref().is_some_and(|(_, s, _)| *s != d.split) {
                finish(&mut open, manifest, d.index)?;
            }
            if open.is_none() {
                let n = manifest.shards.len();
                let file = match d.split {
                    Split::Train => format!("train_{n:06}.bin"),
                    Split::Val => format!("val_{n:06}.bin"),
                };
                open = Some((
                    ShardWriter::create(&out.join(&file), dtype, vocab, thash)?,
                    d.split,
                    file,
                ));
            }
            let (wr, _, _) = open.as_mut().expect("opened above");
            wr.write(&d.tokens)?;
            match d.split {
                Split::Train => w.train += d.tokens.len() as u64,
                Split::Val => w.val += d.tokens.len() as u64,
            }
            if wr.len() >= opts.shard_tokens {
                finish(&mut open, manifest, d.index + 1)?;
            }
        }
    }
    finish(&mut open, manifest, next)?;
    if let Some(p) = &mut manifest.progress {
        p.chunks_done = next;
        p.complete = true;
    }
    if manifest.shards.iter().all(|s| s.split != Split::Train) {
        return Err(Error::Data(
            "no training tokens: the input is empty or all held out".into(),
        ));
    }
    manifest.write(out)?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Corpus;
    use crate::shards::ShardSet;

    /// A small byte-level BPE tokenizer.json with `<|endoftext|>` as id 256.
    fn tokenizer(dir: &Path) -> PathBuf {
        let mut vocab = serde_json::Map::new();
        let mut n = 0;
        let mut map = ['\0'; 256];
        let mut k = 0u32;
        for b in 0..256u32 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            map[b as usize] = if printable {
                char::from_u32(b).unwrap()
            } else {
                k += 1;
                char::from_u32(255 + k).unwrap()
            };
        }
        for c in map {
            vocab.insert(c.to_string(), n.into());
            n += 1;
        }
        vocab.insert("th".into(), n.into());
        let json = serde_json::json!({
            "model": {"type": "BPE", "vocab": vocab, "merges": ["t h"]},
            "pre_tokenizer": {"type": "ByteLevel"},
            "decoder": {"type": "ByteLevel"},
            "added_tokens": [{"id": 257, "content": "<|endoftext|>", "special": true}]
        });
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, json.to_string()).unwrap();
        p
    }

    fn opts(dir: &Path, inputs: Vec<PathBuf>, threads: usize, out: &str) -> PrepareOptions {
        PrepareOptions {
            inputs,
            tokenizer: tokenizer(dir),
            out: dir.join(out),
            threads,
            shard_tokens: 50_000,
            val_fraction: 0.1,
            end_of_document: None,
            chunk_bytes: 16 << 10,
        }
    }

    fn corpus(dir: &Path) -> Vec<PathBuf> {
        let docs = dir.join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        let big: String = (0..20_000)
            .map(|i| format!("line {i} of the big file\n"))
            .collect();
        std::fs::write(docs.join("a.txt"), &big).unwrap();
        std::fs::write(docs.join("b.txt"), "the second document").unwrap();
        let jsonl: String = (0..500)
            .map(|i| {
                format!(
                    "{}\n",
                    serde_json::json!({"text": format!("record {i}: the thing"), "id": i})
                )
            })
            .collect();
        std::fs::write(dir.join("c.jsonl"), jsonl).unwrap();
        vec![docs, dir.join("c.jsonl")]
    }

    fn all_tokens(out: &Path) -> (Vec<u32>, Vec<u32>) {
        let set = ShardSet::open(out).unwrap();
        let read = |v: &[crate::shards::TokenShard]| {
            let mut all = Vec::new();
            for s in v {
                s.read(0, s.len() as usize, &mut all).unwrap();
            }
            all
        };
        (read(&set.val), read(&set.train))
    }

    #[test]
    fn prepared_shards_hold_every_document_with_separators_whatever_the_threads() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = corpus(dir.path());
        let one = prepare(&opts(dir.path(), inputs.clone(), 1, "one"), |_, _| {}).unwrap();
        let three = prepare(&opts(dir.path(), inputs, 3, "three"), |_, _| {}).unwrap();
        assert_eq!(one.documents, 502);
        assert_eq!(one.tokens, three.tokens);
        assert!(one.shards >= 3, "{one:?}");
        let (v1, t1) = all_tokens(&dir.path().join("one"));
        assert_eq!(
            (v1.clone(), t1.clone()),
            all_tokens(&dir.path().join("three"))
        );
        assert!(!v1.is_empty() && v1.len() < t1.len());
        // Decoding gives the documents back, separated by the end-of-document token.
        let tok = BpeTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
        let all = [v1, t1].concat();
        let docs: Vec<&[u32]> = all.split(|&t| t == 257).collect();
        assert_eq!(docs.len(), 503, "502 documents and the empty tail");
        assert_eq!(tok.decode(docs[1]), "the second document");
        assert_eq!(tok.decode(docs[2]), "record 0: the thing");
        assert!(
            tok.decode(docs[0])
                .starts_with("line 0 of the big file\nline 1 ")
        );
        assert_eq!(
            tok.decode(docs[0]).len(),
            std::fs::read(dir.path().join("docs/a.txt")).unwrap().len()
        );
        // And it trains: a corpus from the folder.
        let c = Corpus::from_path(&dir.path().join("one"), &tok, 0.1).unwrap();
        assert_eq!(c.vocab_size(), 258);
        assert_eq!(c.end_of_document(), Some(257));
        c.train_batch(0, 0, 0, 4, 64).unwrap();
    }

    #[test]
    fn an_interrupted_prepare_resumes_to_the_same_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = corpus(dir.path());
        prepare(&opts(dir.path(), inputs.clone(), 2, "full"), |_, _| {}).unwrap();
        let o = opts(dir.path(), inputs.clone(), 2, "part");
        prepare(&o, |_, _| {}).unwrap();
        // Forget the last shards and mark the job unfinished, as a crash after shard 1 would.
        let mut m = Manifest::read_any(&o.out).unwrap();
        let keep = 2;
        for s in &m.shards[keep..] {
            std::fs::rename(o.out.join(&s.file), o.out.join(format!("{}.tmp", s.file))).unwrap();
        }
        m.shards.truncate(keep);
        let p = m.progress.as_mut().unwrap();
        p.complete = false;
        // Chunk count after shard `keep`: recompute by a fresh run's manifest is not recorded, so
        // use the progress the writer recorded for this prefix.
        let full = Manifest::read_any(&dir.path().join("full")).unwrap();
        assert!(full.shards.len() > keep);
        p.chunks_done = chunks_after(&o, keep);
        m.write(&o.out).unwrap();
        let s = prepare(&o, |_, _| {}).unwrap();
        assert!(s.resumed_chunks > 0);
        assert_eq!(all_tokens(&o.out), all_tokens(&dir.path().join("full")));
        // A finished dataset is not redone, and another job is refused.
        assert!(prepare(&o, |_, _| {}).is_err());
        let mut other = o.clone();
        other.shard_tokens = 7;
        assert!(prepare(&other, |_, _| {}).is_err());
    }

    /// Chunks done when shard `k` was finished, from a run that records it.
    fn chunks_after(o: &PrepareOptions, k: usize) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = o.clone();
        probe.out = dir.path().join("probe");
        let mut seen = Vec::new();
        let m = std::cell::RefCell::new(&mut seen);
        prepare(&probe, |_, _| {
            if let Ok(man) = Manifest::read_any(&probe.out) {
                m.borrow_mut()
                    .push((man.shards.len(), man.progress.unwrap().chunks_done));
            }
        })
        .unwrap();
        seen.iter().find(|(n, _)| *n == k).map(|x| x.1).unwrap()
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bad.jsonl"),
            "{\"text\": \"ok\"}\n{\"txt\": 1}\n",
        )
        .unwrap();
        let e = prepare(
            &opts(dir.path(), vec![dir.path().join("bad.jsonl")], 1, "o"),
            |_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad.jsonl:2"), "{e}");
        std::fs::write(dir.path().join("bin.txt"), [b'a', 0xff, b'\n']).unwrap();
        let e = prepare(
            &opts(dir.path(), vec![dir.path().join("bin.txt")], 1, "p"),
            |_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("UTF-8"), "{e}");
        let e = prepare(
            &opts(dir.path(), vec![dir.path().join("missing")], 1, "q"),
            |_, _| {},
        );
        assert!(matches!(e, Err(Error::Io { .. })));
    }
}
