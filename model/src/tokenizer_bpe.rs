//! A reader of Hugging Face `tokenizer.json` files for BPE models, in the two flavours Llama-style
//! checkpoints ship:
//!
//! - byte-level BPE (GPT-2, Llama 3): text is split by the GPT-2 pre-tokenizer rules, each piece's
//!   UTF-8 bytes are mapped to printable characters (GPT-2's `bytes_to_unicode`), then merged;
//! - SentencePiece-style BPE (Llama 2, TinyLlama): spaces become `▁`, a `▁` is prepended, characters
//!   are merged, and characters outside the vocabulary fall back to `<0xXX>` byte tokens.
//!
//! Written here rather than taken from the `tokenizers` crate to keep its build time (and its
//! regex/onig dependencies) out of every binary. Limits: `Split` pre-tokenizers with custom regexes
//! (Llama 3) are approximated by the GPT-2 rules, so ids can differ from HF's on some inputs while
//! still decoding to the same text; normalizers other than Prepend/Replace are rejected.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::Error;
use crate::tokenizer::Tokenizer;

/// Largest tokenizer.json we read (Llama 3's is ~9 MB).
const MAX_FILE_BYTES: u64 = 64 << 20;

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
    ranks: HashMap<(String, String), usize>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    /// Byte-fallback token ids (`<0xXX>`), SentencePiece flavour.
    byte_tokens: Option<Vec<u32>>,
    unk: Option<u32>,
    special: HashMap<u32, String>,
}

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
            special.insert(id as u32, content.to_string());
            vocab.entry(content.to_string()).or_insert(id as u32);
        }
        let max_id = vocab.values().copied().max().unwrap_or(0) as usize;
        let mut id_to_token = vec![None; max_id + 1];
        for (t, &id) in &vocab {
            id_to_token[id as usize] = Some(t.clone());
        }

        let mut ranks = HashMap::new();
        for (rank, m) in model
            .get("merges")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let pair = match m {
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
            ranks.entry(pair).or_insert(rank);
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
            ranks,
            byte_to_char,
            char_to_byte,
            byte_tokens,
            unk,
            special,
        })
    }

    /// Merges `symbols` by rank (lowest first), as BPE does.
    fn merge(&self, mut symbols: Vec<String>) -> Vec<String> {
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { return symbols };
            let (a, b) = (symbols[i].clone(), symbols[i + 1].clone());
            // Merge every occurrence of the pair, left to right.
            let mut out = Vec::with_capacity(symbols.len());
            let mut j = 0;
            while j < symbols.len() {
                if j + 1 < symbols.len() && symbols[j] == a && symbols[j + 1] == b {
                    out.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    out.push(std::mem::take(&mut symbols[j]));
                    j += 1;
                }
            }
            symbols = out;
        }
    }

    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        match self.flavour {
            Flavour::ByteLevel => {
                let symbols = piece
                    .bytes()
                    .map(|b| self.byte_to_char[b as usize].to_string())
                    .collect();
                for s in self.merge(symbols) {
                    match self.vocab.get(&s) {
                        Some(&id) => out.push(id),
                        // A merge result missing from the vocab: emit its bytes, which all exist.
                        None => out.extend(s.chars().map(|c| self.vocab[&c.to_string()])),
                    }
                }
            }
            Flavour::SentencePiece => {
                let symbols = piece.chars().map(String::from).collect();
                for s in self.merge(symbols) {
                    if let Some(&id) = self.vocab.get(&s) {
                        out.push(id);
                    } else if let Some(bytes) = &self.byte_tokens {
                        out.extend(s.bytes().map(|b| bytes[b as usize]));
                    } else if let Some(unk) = self.unk {
                        out.push(unk);
                    }
                }
            }
        }
    }
}

/// GPT-2 pre-tokenization: contractions, ` ?letters`, ` ?digits`, ` ?other`, and whitespace runs
/// (a run before a word leaves its last space to the word).
fn gpt2_split(text: &str) -> Vec<&str> {
    #[derive(PartialEq, Clone, Copy)]
    enum K {
        L,
        N,
        S,
        O,
    }
    let kind = |c: char| {
        if c.is_alphabetic() {
            K::L
        } else if c.is_numeric() {
            K::N
        } else if c.is_whitespace() {
            K::S
        } else {
            K::O
        }
    };
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let end_of = |i: usize| chars.get(i).map_or(text.len(), |c| c.0);
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = i;
        let c = chars[i].1;
        if c == '\'' {
            let rest = &text[chars[i].0..];
            if let Some(p) = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
                .iter()
                .find(|p| rest.starts_with(**p))
            {
                i += p.chars().count();
                out.push(&text[chars[start].0..end_of(i)]);
                continue;
            }
        }
        let k = kind(c);
        if k == K::S {
            let mut j = i;
            while j < chars.len() && kind(chars[j].1) == K::S {
                j += 1;
            }
            // `\s+(?!\S)`: leave one space for a following word.
            if j < chars.len() && j - i > 1 && chars[j - 1].1 == ' ' {
                j -= 1;
            } else if j < chars.len() && j - i == 1 && c == ' ' {
                // A single space joins the next word below.
                let nk = kind(chars[j].1);
                let mut m = j;
                while m < chars.len() && kind(chars[m].1) == nk {
                    m += 1;
                }
                out.push(&text[chars[start].0..end_of(m)]);
                i = m;
                continue;
            }
            out.push(&text[chars[start].0..end_of(j)]);
            i = j;
            continue;
        }
        let mut j = i;
        while j < chars.len()
            && kind(chars[j].1) == k
            && !(k == K::O && chars[j].1 == '\'' && j > i)
        {
            j += 1;
        }
        out.push(&text[chars[start].0..end_of(j)]);
        i = j;
    }
    out
}

impl Tokenizer for BpeTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        match self.flavour {
            Flavour::ByteLevel => {
                for piece in gpt2_split(text) {
                    self.encode_piece(piece, &mut out);
                }
            }
            Flavour::SentencePiece => {
                if text.is_empty() {
                    return out;
                }
                let s = format!("\u{2581}{}", text.replace(' ', "\u{2581}"));
                self.encode_piece(&s, &mut out);
            }
        }
        out
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(tok) = self.id_to_token.get(id as usize).and_then(Option::as_ref) else {
                bytes.extend("\u{FFFD}".as_bytes());
                continue;
            };
            if self.special.contains_key(&id) {
                bytes.extend(tok.as_bytes());
                continue;
            }
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
                        Some(b) if tok.len() == 6 => bytes.push(b),
                        _ => bytes.extend(tok.replace('\u{2581}', " ").as_bytes()),
                    }
                }
            }
        }
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
        assert_eq!(gpt2_split("Hello world"), vec!["Hello", " world"]);
        assert_eq!(
            gpt2_split("I'm 42 years!!  ok"),
            vec!["I", "'m", " 42", " years", "!!", " ", " ok"]
        );
        assert_eq!(gpt2_split("a\n\nb "), vec!["a", "\n\n", "b", " "]);
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
        assert_eq!(t.decode(&[300]), "<|endoftext|>");
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
