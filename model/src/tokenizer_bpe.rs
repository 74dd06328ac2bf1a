//! A reader of Hugging Face `tokenizer.json` files for BPE models, in the two flavours Llama-style
//! checkpoints ship:
//!
//! - byte-level BPE (GPT-2): text is split by the GPT-2 pre-tokenizer regex, each piece's UTF-8
//!   bytes are mapped to printable characters (GPT-2's `bytes_to_unicode`), then merged;
//! - SentencePiece-style BPE (Llama 2, TinyLlama): a `▁` is prepended, spaces become `▁`, the
//!   whole text is merged as one word, and characters outside the vocabulary fall back to
//!   `<0xXX>` byte tokens.
//!
//! It follows HF tokenizers' algorithm step for step, so the ids are the same: added tokens are
//! matched in the input first (longest match, leftmost) and the text between them is encoded
//! separately; merges are applied lowest rank first, ties leftmost first, from a heap over a linked
//! list of symbols (O(n log n), so a long SentencePiece text is not quadratic); decoding skips
//! special tokens, as HF's `decode` does by default. `tests/tokenizer_reference.rs` checks ids and
//! decoded text against HF's own output. Written here rather than taken from the `tokenizers`
//! crate to keep its build time (and onig) out of every binary. Limits: `Split` pre-tokenizers
//! with custom regexes (Llama 3) and normalizers other than Prepend/Replace are not supported.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use crate::Error;
use crate::tokenizer::Tokenizer;

/// Largest tokenizer.json we read (Llama 3's is ~9 MB).
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Words kept in an encoder's cache before it is cleared (bounds its memory).
const CACHE_WORDS: usize = 1 << 16;

/// GPT-2's pre-tokenizer regex without its `\s+(?!\S)` look-ahead, which [`gpt2_split`] applies by
/// hand (the `regex` crate has no look-around).
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    ByteLevel,
    SentencePiece,
}

/// A BPE tokenizer read from a HF `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct BpeTokenizer {
    flavour: Flavour,
    vocab: HashMap<String, u32>,
    id_to_token: Vec<Option<String>>,
    /// Single-character tokens, the symbols a word starts from.
    char_ids: HashMap<char, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    /// Byte-fallback token ids (`<0xXX>`), SentencePiece flavour.
    byte_tokens: Option<Vec<u32>>,
    unk: Option<u32>,
    /// Ids of tokens flagged special (skipped when decoding).
    special: HashMap<u32, String>,
    /// Added tokens matched verbatim in the input, longest first.
    added: Vec<(String, u32)>,
    split: Regex,
}

/// A word cache for [`BpeTokenizer::encode_cached`]: one per thread, bounded.
#[derive(Debug, Default)]
pub struct WordCache(HashMap<String, Vec<u32>>);

fn bad(msg: impl Into<String>) -> Error {
    Error::Tokenizer(msg.into())
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("latin-1 is valid")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("small code points are valid")
        };
    }
    map
}

impl BpeTokenizer {
    /// Loads a HF tokenizer.json (BPE, byte-level or SentencePiece-style).
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_FILE_BYTES {
            return Err(bad(format!("{}: {len} bytes is too large", path.display())));
        }
        Self::from_json(&std::fs::read(path).map_err(io)?)
    }

    /// Parses the bytes of a `tokenizer.json`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("tokenizer.json: {e}")))?;
        let model = v.get("model").ok_or_else(|| bad("no model"))?;
        let kind = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
        if kind != "BPE" {
            return Err(bad(format!(
                "model type {kind} is not supported (BPE only)"
            )));
        }
        let vocab_v = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no vocab"))?;
        let mut vocab = HashMap::with_capacity(vocab_v.len());
        for (tok, id) in vocab_v {
            let id = id
                .as_u64()
                .filter(|&i| i < crate::config::MAX_VOCAB as u64)
                .ok_or_else(|| bad(format!("bad id for token {tok:?}")))?;
            vocab.insert(tok.clone(), id as u32);
        }
        let mut special = HashMap::new();
        let mut added = Vec::new();
        for t in v
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(content)) = (
                t.get("id").and_then(Value::as_u64),
                t.get("content").and_then(Value::as_str),
            ) else {
                return Err(bad("malformed added_tokens entry"));
            };
            if id >= crate::config::MAX_VOCAB as u64 {
                return Err(bad(format!("added token id {id} too large")));
            }
            if t.get("special").and_then(Value::as_bool).unwrap_or(false) {
                special.insert(id as u32, content.to_string());
            }
            if !content.is_empty() {
                added.push((content.to_string(), id as u32));
            }
            vocab.entry(content.to_string()).or_insert(id as u32);
        }
        // Longest first, so that a token that is a prefix of another does not win.
        added.sort_by_key(|(c, _)| Reverse(c.len()));
        let max_id = vocab.values().copied().max().unwrap_or(0) as usize;
        let mut id_to_token = vec![None; max_id + 1];
        for (t, &id) in &vocab {
            id_to_token[id as usize] = Some(t.clone());
        }
        let char_ids = vocab
            .iter()
            .filter_map(|(t, &id)| {
                let mut cs = t.chars();
                match (cs.next(), cs.next()) {
                    (Some(c), None) => Some((c, id)),
                    _ => None,
                }
            })
            .collect();

        let mut merges = HashMap::new();
        for (rank, m) in model
            .get("merges")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let (a, b) = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => a[0]
                    .as_str()
                    .zip(a[1].as_str())
                    .map(|(x, y)| (x.to_string(), y.to_string())),
                _ => None,
            }
            .ok_or_else(|| bad(format!("malformed merge {m}")))?;
            let id = |t: &str| {
                vocab
                    .get(t)
                    .copied()
                    .ok_or_else(|| bad(format!("merge token {t:?} is not in the vocabulary")))
            };
            let pair = (id(&a)?, id(&b)?);
            let merged = id(&format!("{a}{b}"))?;
            // HF builds its merge map by inserting in order: a repeated pair keeps the last rank.
            merges.insert(pair, (rank as u32, merged));
        }

        let mentions =
            |key: &str, what: &str| v.get(key).is_some_and(|x| x.to_string().contains(what));
        let flavour = if mentions("pre_tokenizer", "ByteLevel") || mentions("decoder", "ByteLevel")
        {
            Flavour::ByteLevel
        } else if mentions("pre_tokenizer", "Metaspace")
            || mentions("normalizer", "\u{2581}")
            || mentions("decoder", "ByteFallback")
        {
            Flavour::SentencePiece
        } else {
            return Err(bad(
                "neither a byte-level nor a SentencePiece-style BPE tokenizer",
            ));
        };
        let byte_fallback = model
            .get("byte_fallback")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let byte_tokens = if flavour == Flavour::SentencePiece && byte_fallback {
            let ids: Option<Vec<u32>> = (0..256)
                .map(|b| vocab.get(&format!("<0x{b:02X}>")).copied())
                .collect();
            Some(ids.ok_or_else(|| bad("byte_fallback without all 256 <0xXX> tokens"))?)
        } else {
            None
        };
        let unk = model
            .get("unk_token")
            .and_then(Value::as_str)
            .and_then(|u| vocab.get(u).copied());
        let byte_to_char = bytes_to_unicode();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        if flavour == Flavour::ByteLevel
            && byte_to_char
                .iter()
                .any(|c| !vocab.contains_key(&c.to_string()))
        {
            return Err(bad(
                "byte-level vocabulary lacks some of the 256 byte symbols",
            ));
        }
        Ok(BpeTokenizer {
            flavour,
            vocab,
            id_to_token,
            char_ids,
            merges,
            byte_to_char,
            char_to_byte,
            byte_tokens,
            unk,
            special,
            added,
            split: Regex::new(GPT2_PATTERN).expect("the GPT-2 pattern compiles"),
        })
    }

    /// The id of a token string, if the vocabulary has it (e.g. `<|endoftext|>`, `</s>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The token that separates documents in a token stream: GPT-2's `<|endoftext|>`, or the
    /// end-of-sequence token `</s>` / `<eos>` / `<|end_of_text|>`, whichever the vocabulary has.
    pub fn end_of_document(&self) -> Option<u32> {
        ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"]
            .iter()
            .find_map(|t| self.token_id(t))
    }

    /// Applies BPE merges to one word's symbols (HF's `Word::merge_all`): lowest rank first, ties
    /// leftmost first, over a linked list so that each merge is O(log n).
    fn merge_word(&self, ids: &mut Vec<u32>) {
        let n = ids.len();
        if n < 2 {
            return;
        }
        let mut next: Vec<usize> = (1..=n).collect(); // n = none
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect(); // MAX = none
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some(&(rank, new)) = self.merges.get(&(ids[i], ids[i + 1])) {
                heap.push(Reverse((rank, i, new)));
            }
        }
        while let Some(Reverse((_, pos, new))) = heap.pop() {
            if !alive[pos] || next[pos] >= n {
                continue;
            }
            let right = next[pos];
            // A stale entry: the pair at `pos` has changed since it was queued.
            if self.merges.get(&(ids[pos], ids[right])).map(|m| m.1) != Some(new) {
                continue;
            }
            ids[pos] = new;
            alive[right] = false;
            next[pos] = next[right];
            if next[pos] < n {
                prev[next[pos]] = pos;
            }
            let p = prev[pos];
            if p < n
                && let Some(&(rank, m)) = self.merges.get(&(ids[p], ids[pos]))
            {
                heap.push(Reverse((rank, p, m)));
            }
            if next[pos] < n
                && let Some(&(rank, m)) = self.merges.get(&(ids[pos], ids[next[pos]]))
            {
                heap.push(Reverse((rank, pos, m)));
            }
        }
        let mut k = 0;
        for i in 0..n {
            if alive[i] {
                ids[k] = ids[i];
                k += 1;
            }
        }
        ids.truncate(k);
    }

    /// The starting symbols of a word: one per character, characters outside the vocabulary as
    /// their byte-fallback tokens (or `unk`).
    fn symbols(&self, word: &str, out: &mut Vec<u32>) {
        for c in word.chars() {
            if let Some(&id) = self.char_ids.get(&c) {
                out.push(id);
            } else if let Some(bytes) = &self.byte_tokens {
                let mut buf = [0u8; 4];
                out.extend(c.encode_utf8(&mut buf).bytes().map(|b| bytes[b as usize]));
            } else if let Some(unk) = self.unk {
                out.push(unk);
            }
        }
    }

    /// Encodes text between added tokens.
    fn encode_segment(&self, text: &str, cache: &mut WordCache, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        match self.flavour {
            Flavour::ByteLevel => {
                let mut mapped = String::new();
                for piece in gpt2_split(&self.split, text) {
                    if let Some(ids) = cache.0.get(piece) {
                        out.extend_from_slice(ids);
                        continue;
                    }
                    mapped.clear();
                    mapped.extend(piece.bytes().map(|b| self.byte_to_char[b as usize]));
                    let mut ids = Vec::with_capacity(mapped.len());
                    self.symbols(&mapped, &mut ids);
                    self.merge_word(&mut ids);
                    out.extend_from_slice(&ids);
                    if cache.0.len() >= CACHE_WORDS {
                        cache.0.clear();
                    }
                    cache.0.insert(piece.to_string(), ids);
                }
            }
            Flavour::SentencePiece => {
                let s = format!("\u{2581}{}", text.replace(' ', "\u{2581}"));
                let mut ids = Vec::with_capacity(s.len());
                self.symbols(&s, &mut ids);
                self.merge_word(&mut ids);
                out.extend_from_slice(&ids);
            }
        }
    }

    /// [`Tokenizer::encode`] with a caller-held word cache (faster over many documents).
    pub fn encode_cached(&self, text: &str, cache: &mut WordCache) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut rest = text;
        while !rest.is_empty() {
            // The leftmost added token, the longest at that position.
            let hit = self
                .added
                .iter()
                .filter_map(|(c, id)| rest.find(c.as_str()).map(|at| (at, Reverse(c.len()), *id)))
                .min();
            match hit {
                Some((at, Reverse(len), id)) => {
                    self.encode_segment(&rest[..at], cache, &mut out);
                    out.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_segment(rest, cache, &mut out);
                    break;
                }
            }
        }
        out
    }
}

/// GPT-2 pre-tokenization: the regex `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+
/// |\s+(?!\S)|\s+`. The look-ahead leaves a whitespace run's last character to what follows
/// (joined to a word if it is a space), so a run followed by text gives up its last character.
fn gpt2_split<'a>(re: &Regex, text: &'a str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        // Every character matches some branch, so the match starts at `pos`.
        let Some(m) = re.find_at(text, pos) else {
            out.push(&text[pos..]);
            break;
        };
        let mut end = m.end();
        let piece = m.as_str();
        if end < text.len() && piece.chars().all(char::is_whitespace) {
            let last = piece.chars().next_back().map_or(0, char::len_utf8);
            if piece.len() > last {
                end -= last;
            }
        }
        out.push(&text[pos..end]);
        pos = end;
    }
    out
}

impl Tokenizer for BpeTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_cached(text, &mut WordCache::default())
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        // SentencePiece: a run of byte tokens decodes as one UTF-8 string, or one U+FFFD per token.
        let mut run: Vec<u8> = Vec::new();
        let flush = |run: &mut Vec<u8>, bytes: &mut Vec<u8>| {
            if run.is_empty() {
                return;
            }
            match std::str::from_utf8(run) {
                Ok(s) => bytes.extend(s.as_bytes()),
                Err(_) => (0..run.len()).for_each(|_| bytes.extend("\u{FFFD}".as_bytes())),
            }
            run.clear();
        };
        for &id in ids {
            if self.special.contains_key(&id) {
                continue;
            }
            let Some(tok) = self.id_to_token.get(id as usize).and_then(Option::as_ref) else {
                flush(&mut run, &mut bytes);
                bytes.extend("\u{FFFD}".as_bytes());
                continue;
            };
            match self.flavour {
                Flavour::ByteLevel => {
                    for c in tok.chars() {
                        match self.char_to_byte.get(&c) {
                            Some(&b) => bytes.push(b),
                            None => bytes.extend(c.to_string().as_bytes()),
                        }
                    }
                }
                Flavour::SentencePiece => {
                    let hex = tok.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(b) if tok.len() == 6 => run.push(b),
                        _ => {
                            flush(&mut run, &mut bytes);
                            bytes.extend(tok.replace('\u{2581}', " ").as_bytes());
                        }
                    }
                }
            }
        }
        flush(&mut run, &mut bytes);
        let s = String::from_utf8_lossy(&bytes).into_owned();
        match self.flavour {
            // The prepended `▁` of the first word decodes to a leading space: strip it.
            Flavour::SentencePiece => s.strip_prefix(' ').map(str::to_string).unwrap_or(s),
            Flavour::ByteLevel => s,
        }
    }

    fn vocab_size(&self) -> usize {
        self.id_to_token.len()
    }

    fn name(&self) -> &str {
        match self.flavour {
            Flavour::ByteLevel => "bpe-bytelevel",
            Flavour::SentencePiece => "bpe-sentencepiece",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_level(merges: &[&str], extra: &[&str]) -> BpeTokenizer {
        let mut vocab = serde_json::Map::new();
        for c in bytes_to_unicode() {
            let n = vocab.len();
            vocab.insert(c.to_string(), n.into());
        }
        for t in extra {
            let n = vocab.len();
            vocab.insert(t.to_string(), n.into());
        }
        let json = serde_json::json!({
            "model": {"type": "BPE", "vocab": vocab, "merges": merges},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
            "decoder": {"type": "ByteLevel"},
            "added_tokens": [{"id": 300, "content": "<|endoftext|>", "special": true}]
        });
        BpeTokenizer::from_json(json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn gpt2_pre_tokenizer_splits_like_the_regex() {
        let re = Regex::new(GPT2_PATTERN).unwrap();
        assert_eq!(gpt2_split(&re, "Hello world"), vec!["Hello", " world"]);
        assert_eq!(
            gpt2_split(&re, "I'm 42 years!!  ok"),
            vec!["I", "'m", " 42", " years", "!!", " ", " ok"]
        );
        // `\s+(?!\S)` leaves the run's last character to the next match, even a newline.
        assert_eq!(gpt2_split(&re, "a\n\nb "), vec!["a", "\n", "\n", "b", " "]);
        assert_eq!(gpt2_split(&re, "x!!'s"), vec!["x", "!!'", "s"]);
    }

    #[test]
    fn byte_level_bpe_merges_by_rank_and_round_trips() {
        // "Ġ" is the byte-level symbol of a space.
        let t = byte_level(
            &["l o", "Ġ lo", "lo w", "Ġlo w"],
            &["lo", "low", "Ġlo", "Ġlow"],
        );
        let ids = t.encode("low low");
        let low = t.vocab["low"];
        let glow = t.vocab["Ġlow"];
        assert_eq!(ids, vec![low, glow]);
        // Rank order matters: with "lo w" ranked before "Ġ lo", " low" ends as "Ġ" + "low".
        let t2 = byte_level(
            &["l o", "lo w", "Ġ lo", "Ġlo w"],
            &["lo", "low", "Ġlo", "Ġlow"],
        );
        assert_eq!(t2.encode(" low"), vec![t2.vocab["Ġ"], t2.vocab["low"]]);
        for text in ["low low", "lower, ünï 🦀\n\n  x", ""] {
            assert_eq!(t.decode(&t.encode(text)), text);
        }
        // Special tokens are matched in the input and skipped when decoding, as HF does.
        assert_eq!(t.encode("a<|endoftext|>"), vec![t.vocab["a"], 300]);
        assert_eq!(t.decode(&[300]), "");
        assert_eq!(t.vocab_size(), 301);
        assert!(t.decode(&[250_000]).contains('\u{FFFD}'));
    }

    #[test]
    fn sentencepiece_bpe_with_byte_fallback() {
        let mut vocab = serde_json::Map::new();
        for t in ["<unk>", "<s>", "</s>"] {
            let n = vocab.len();
            vocab.insert(t.into(), n.into());
        }
        for b in 0..256 {
            let n = vocab.len();
            vocab.insert(format!("<0x{b:02X}>"), n.into());
        }
        for t in ["▁", "h", "i", "▁h", "▁hi", "t", "▁t"] {
            let n = vocab.len();
            vocab.insert(t.into(), n.into());
        }
        let json = serde_json::json!({
            "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "model": {"type": "BPE", "vocab": vocab, "merges": ["▁ h", "▁h i", "▁ t"], "byte_fallback": true, "unk_token": "<unk>"},
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]}
        });
        let t = BpeTokenizer::from_json(json.to_string().as_bytes()).unwrap();
        let ids = t.encode("hi hi t");
        assert_eq!(ids, vec![t.vocab["▁hi"], t.vocab["▁hi"], t.vocab["▁t"]]);
        // "é" is not in the vocab: its two UTF-8 bytes fall back to byte tokens.
        let ids = t.encode("hé");
        assert_eq!(ids[ids.len() - 2..], [t.vocab["<0xC3>"], t.vocab["<0xA9>"]]);
        assert_eq!(t.decode(&ids), "hé");
        assert_eq!(t.decode(&t.encode("hi there")), "hi there");
    }

    #[test]
    fn malformed_tokenizer_files_give_typed_errors() {
        for bad in [
            &b"not json"[..],
            br#"{"model": {"type": "Unigram", "vocab": []}}"#,
            br#"{"model": {"type": "BPE", "vocab": {"a": -1}}, "pre_tokenizer": {"type": "ByteLevel"}}"#,
            br#"{"model": {"type": "BPE", "vocab": {"a": 99999999999}}, "pre_tokenizer": {"type": "ByteLevel"}}"#,
            br#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [3]}, "pre_tokenizer": {"type": "ByteLevel"}}"#,
            br#"{"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "ByteLevel"}}"#,
            br#"{"model": {"type": "BPE", "vocab": {"a": 0}}}"#,
        ] {
            assert!(matches!(BpeTokenizer::from_json(bad), Err(Error::Tokenizer(_))), "{}", String::from_utf8_lossy(bad));
        }
    }
}
