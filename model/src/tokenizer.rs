//! Tokenizers: byte-level by default (vocab 256, id = byte value), and a Hugging Face
//! `tokenizer.json` (byte-level BPE, as in GPT-2/Llama 3) read by our own small reader so that we do not
//! pull the `tokenizers` crate and its build time into every binary.

/// Text to token ids and back. Object-safe so corpora and commands can take `&dyn Tokenizer`.
pub trait Tokenizer: Send + Sync {
    /// Token ids of `text`, without special tokens.
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Text of `ids`; ids outside the vocabulary and invalid UTF-8 become U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
    /// Number of ids the model must cover (max id + 1).
    fn vocab_size(&self) -> usize;
    /// A short name for logs and JSON output.
    fn name(&self) -> &str;
}

/// One token per byte of UTF-8: no training, no files, and any text round-trips exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .map(|&i| u8::try_from(i).unwrap_or(b'?'))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn vocab_size(&self) -> usize {
        256
    }

    fn name(&self) -> &str {
        "byte"
    }
}

/// The tokenizer.json a path names: the file itself, or `tokenizer.json` in a directory.
pub fn tokenizer_file(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    }
}

/// Loads a tokenizer: a HF `tokenizer.json` file, or a directory containing one.
pub fn load_tokenizer(path: &std::path::Path) -> Result<Box<dyn Tokenizer>, crate::Error> {
    Ok(Box::new(crate::tokenizer_bpe::BpeTokenizer::from_file(
        &tokenizer_file(path),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips_any_text() {
        let t = ByteTokenizer;
        let text = "Once upon a time, ünïcödé 🦀\n";
        let ids = t.encode(text);
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        assert_eq!(t.decode(&ids), text);
        assert_eq!(t.encode("A"), vec![65]);
    }

    #[test]
    fn byte_tokenizer_decodes_out_of_range_ids_without_panicking() {
        let t = ByteTokenizer;
        assert_eq!(t.decode(&[72, 1000, 105]), "H?i");
        // A lone continuation byte is invalid UTF-8: replaced, not a panic.
        assert_eq!(t.decode(&[0x80]), "\u{FFFD}");
    }
}
