//! Token shards: flat files of token ids, memory-mapped for training, never loaded whole.
//!
//! Our format (written by `swarm data prepare`, [`ShardWriter`]): a 64-byte header, then the
//! tokens as little-endian u16 (vocabularies up to 65,536) or u32.
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `SWTOKSHD` |
//! | 8..12 | version (1), u32 LE |
//! | 12..16 | bytes per token (2 or 4), u32 LE |
//! | 16..24 | token count, u64 LE |
//! | 24..28 | vocabulary size (every id is below it), u32 LE |
//! | 28..32 | zero |
//! | 32..64 | BLAKE3 hash of the tokenizer.json that made the ids |
//!
//! A folder of shards has a `manifest.json` ([`Manifest`]) naming each shard, its token count and
//! split (train or val), the tokenizer's hash and vocabulary, and the end-of-document token that
//! separates documents in the stream.
//!
//! llm.c's `.bin` shards are read as they are ([`TokenShard::open`] tells the formats apart by their
//! first bytes): a header of 256 little-endian i32 (magic 20240520 with version 1 and u16 GPT-2 ids,
//! or magic 20240801 with version 7 and u32 Llama 3 ids; the token count at index 2), then the
//! tokens. A folder of them without a manifest is a dataset too: files whose name contains `val`
//! are the validation split (llm.c's `*_val_*.bin`), the others the training split.
//!
//! Every file is untrusted: the header, the file length implied by the count, and each token id
//! read (against the vocabulary) are checked, with typed errors; nothing is allocated from a
//! length field.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// Magic of our shard files.
pub const MAGIC: [u8; 8] = *b"SWTOKSHD";
/// Version of our shard header.
pub const VERSION: u32 = 1;
/// Bytes of our shard header.
pub const HEADER_BYTES: usize = 64;
/// Bytes of an llm.c header (256 x i32).
pub const LLMC_HEADER_BYTES: usize = 1024;
/// llm.c's magic for GPT-2 (u16) token shards, version 1.
pub const LLMC_MAGIC_GPT2: i32 = 20240520;
/// llm.c's magic for Llama 3 (u32) token shards, version 7.
pub const LLMC_MAGIC_LLAMA3: i32 = 20240801;
/// GPT-2's vocabulary (the ids of an llm.c GPT-2 shard are below it).
pub const GPT2_VOCAB: usize = 50257;
/// Llama 3's vocabulary.
pub const LLAMA3_VOCAB: usize = 128256;
/// Name of a dataset folder's index.
pub const MANIFEST: &str = "manifest.json";
/// Value of [`Manifest::format`].
pub const FORMAT: &str = "swarm-token-shards";
/// Largest manifest we parse.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Most shards in one dataset.
const MAX_SHARDS: usize = 1 << 20;

fn bad(msg: impl Into<String>) -> Error {
    Error::Data(msg.into())
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Width of a token id in a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// Ids below 2^16, two bytes each.
    U16,
    /// Four bytes each.
    U32,
}

impl Dtype {
    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }

    /// The narrowest dtype holding every id of a vocabulary of `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
}

/// Which split a shard belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split.
    Train,
    /// The validation split.
    Val,
}

/// The header of one of our shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardHeader {
    /// Width of its ids.
    pub dtype: Dtype,
    /// Tokens it holds.
    pub tokens: u64,
    /// Every id is below this.
    pub vocab_size: u32,
    /// BLAKE3 of the tokenizer it was made with.
    pub tokenizer_hash: [u8; 32],
}

impl ShardHeader {
    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(self.dtype.width() as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.tokens.to_le_bytes());
        h[24..28].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[32..].copy_from_slice(&self.tokenizer_hash);
        h
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Where a shard's bytes live: a read-only memory map, or memory (tests, fuzzing).
enum Backing {
    Map(memmap2::Mmap),
    Bytes(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Bytes(b) => b,
        }
    }
}

/// What kind of file a shard came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardKind {
    /// Ours, with a [`ShardHeader`].
    Swarm,
    /// llm.c's, with a 256 x i32 header.
    Llmc,
}

/// A validated token shard: its header was checked and its length is exactly header + tokens.
pub struct TokenShard {
    backing: Backing,
    offset: usize,
    dtype: Dtype,
    len: u64,
    kind: ShardKind,
    /// Every id is below this (from the header, or llm.c's known vocabularies).
    vocab_size: usize,
    tokenizer_hash: Option<[u8; 32]>,
    name: String,
}

impl std::fmt::Debug for TokenShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenShard")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("dtype", &self.dtype)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl TokenShard {
    /// Opens and memory-maps a shard file (ours or llm.c's), validating its header and length.
    #[allow(unsafe_code)] // memory-mapped shard files: see the SAFETY comment inside
    pub fn open(path: &Path) -> Result<TokenShard, Error> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: the map is read-only and private to this process. Its bytes are untrusted and
        // parsed as such; if another process truncated the file while mapped, reads past the new
        // end would fault (SIGBUS) — the documented limit of memory-mapped input (shards are
        // written once, atomically renamed into place, and never modified).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        Self::parse(Backing::Map(map), path.display().to_string())
    }

    /// A shard from bytes in memory (same validation as [`TokenShard::open`]).
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<TokenShard, Error> {
        Self::parse(Backing::Bytes(bytes), name.to_string())
    }

    fn parse(backing: Backing, name: String) -> Result<TokenShard, Error> {
        let b = backing.bytes();
        let fail = |m: String| Err(bad(format!("{name}: {m}")));
        if b.len() >= 8 && b[..8] == MAGIC {
            if b.len() < HEADER_BYTES {
                return fail(format!("{} bytes, shorter than the header", b.len()));
            }
            let version = u32_at(b, 8);
            if version != VERSION {
                return fail(format!(
                    "shard version {version}, this build reads {VERSION}"
                ));
            }
            let dtype = match u32_at(b, 12) {
                2 => Dtype::U16,
                4 => Dtype::U32,
                w => return fail(format!("token width {w} bytes (2 or 4 expected)")),
            };
            let tokens = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
            let vocab_size = u32_at(b, 24) as usize;
            if vocab_size == 0 || vocab_size > (1usize << (8 * dtype.width())).min(1 << 31) {
                return fail(format!("vocabulary {vocab_size} does not fit {dtype:?}"));
            }
            let hash: [u8; 32] = b[32..64].try_into().expect("32 bytes");
            Self::finish(
                backing,
                name,
                HEADER_BYTES,
                dtype,
                tokens,
                ShardKind::Swarm,
                vocab_size,
                Some(hash),
            )
        } else if b.len() >= 4 {
            let magic = u32_at(b, 0) as i32;
            let (dtype, want_version, vocab) = match magic {
                LLMC_MAGIC_GPT2 => (Dtype::U16, 1, GPT2_VOCAB),
                LLMC_MAGIC_LLAMA3 => (Dtype::U32, 7, LLAMA3_VOCAB),
                _ => return fail("not a token shard (unknown magic)".into()),
            };
            if b.len() < LLMC_HEADER_BYTES {
                return fail(format!("{} bytes, shorter than llm.c's header", b.len()));
            }
            let version = u32_at(b, 4) as i32;
            if version != want_version {
                return fail(format!(
                    "llm.c magic {magic} with version {version} (expected {want_version})"
                ));
            }
            let tokens = u32_at(b, 8) as i32;
            if tokens < 0 {
                return fail(format!("negative token count {tokens}"));
            }
            Self::finish(
                backing,
                name,
                LLMC_HEADER_BYTES,
                dtype,
                tokens as u64,
                ShardKind::Llmc,
                vocab,
                None,
            )
        } else {
            fail(format!("{} bytes is not a token shard", b.len()))
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        backing: Backing,
        name: String,
        offset: usize,
        dtype: Dtype,
        len: u64,
        kind: ShardKind,
        vocab_size: usize,
        tokenizer_hash: Option<[u8; 32]>,
    ) -> Result<TokenShard, Error> {
        let have = (backing.bytes().len() - offset) as u64;
        let want = len.checked_mul(dtype.width() as u64);
        if want != Some(have) {
            return Err(bad(format!(
                "{name}: header says {len} tokens of {} bytes, the file holds {have} bytes after the header",
                dtype.width()
            )));
        }
        Ok(TokenShard {
            backing,
            offset,
            dtype,
            len,
            kind,
            vocab_size,
            tokenizer_hash,
            name,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Width of its ids.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Ours or another format's.
    pub fn kind(&self) -> ShardKind {
        self.kind
    }

    /// Every id is below this.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Hash of the tokenizer.json that made the ids (our shards only).
    pub fn tokenizer_hash(&self) -> Option<[u8; 32]> {
        self.tokenizer_hash
    }

    /// Appends tokens `start..start + n` to `out`, checking each id against the shard's vocabulary.
    pub fn read(&self, start: u64, n: usize, out: &mut Vec<u32>) -> Result<(), Error> {
        let end = start
            .checked_add(n as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                bad(format!(
                    "{}: tokens {start}..+{n} outside its {} tokens",
                    self.name, self.len
                ))
            })?;
        let w = self.dtype.width();
        let bytes =
            &self.backing.bytes()[self.offset + start as usize * w..self.offset + end as usize * w];
        let first = out.len();
        match self.dtype {
            Dtype::U16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            ),
            Dtype::U32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
        }
        if let Some(&id) = out[first..]
            .iter()
            .find(|&&i| i as usize >= self.vocab_size)
        {
            out.truncate(first);
            return Err(bad(format!(
                "{}: token id {id} outside the vocabulary of {}",
                self.name, self.vocab_size
            )));
        }
        Ok(())
    }
}

/// One shard in a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// File name inside the dataset folder (no path separators).
    pub file: String,
    /// Tokens it holds.
    pub tokens: u64,
    /// Its split.
    pub split: Split,
}

/// The tokenizer a dataset was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    /// `bpe-bytelevel`, `bpe-sentencepiece`, ...
    pub name: String,
    /// BLAKE3 of the tokenizer.json bytes, hex.
    pub hash: String,
    /// Its vocabulary size.
    pub vocab_size: usize,
}

/// `manifest.json`: the index of a folder of shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The manifest's format version.
    pub version: u32,
    /// The tokenizer the dataset was made with.
    pub tokenizer: TokenizerInfo,
    /// Token between documents.
    pub end_of_document: u32,
    /// Width of the shards' ids.
    pub dtype: Dtype,
    /// Every shard, in order.
    pub shards: Vec<ShardEntry>,
    /// Resume bookkeeping of `swarm data prepare` (absent in datasets made elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::prepare::Progress>,
}

impl Manifest {
    /// Reads and checks `dir/manifest.json` of a complete dataset.
    pub fn read(dir: &Path) -> Result<Manifest, Error> {
        let m = Self::read_any(dir)?;
        if m.progress.as_ref().is_some_and(|p| !p.complete) {
            return Err(bad(format!(
                "{} is not complete: run `swarm data prepare` again with the same options to finish it",
                dir.display()
            )));
        }
        Ok(m)
    }

    /// Reads and checks `dir/manifest.json`, complete or not.
    pub fn read_any(dir: &Path) -> Result<Manifest, Error> {
        let path = dir.join(MANIFEST);
        let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        if len > MAX_MANIFEST_BYTES {
            return Err(bad(format!("{}: {len} bytes is too large", path.display())));
        }
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        Self::parse(&bytes).map_err(|e| bad(format!("{}: {e}", path.display())))
    }

    /// Parses and checks manifest bytes.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(format!(
                "format {:?} version {} (expected {FORMAT:?} version {VERSION})",
                m.format, m.version
            ));
        }
        if m.shards.len() > MAX_SHARDS {
            return Err(format!("{} shards, more than {MAX_SHARDS}", m.shards.len()));
        }
        let v = m.tokenizer.vocab_size;
        if v == 0 || v > (1usize << (8 * m.dtype.width())).min(1 << 31) {
            return Err(format!("vocabulary {v} does not fit {:?}", m.dtype));
        }
        if m.end_of_document as usize >= v {
            return Err(format!(
                "end-of-document token {} outside the vocabulary",
                m.end_of_document
            ));
        }
        for s in &m.shards {
            let f = &s.file;
            if f.is_empty() || f.starts_with('.') || f.contains(['/', '\\', '\0']) {
                return Err(format!(
                    "shard file name {f:?} must be a plain name in the folder"
                ));
            }
        }
        Ok(m)
    }

    /// Writes `dir/manifest.json` atomically (temporary file, then rename).
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(".manifest.json.tmp");
        let text = serde_json::to_string_pretty(self).expect("a manifest serializes");
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }
}

/// A dataset's shards, opened: the training and validation splits in order.
#[derive(Debug)]
pub struct ShardSet {
    /// The training split, in order.
    pub train: Vec<TokenShard>,
    /// The validation split, in order.
    pub val: Vec<TokenShard>,
    /// Every id is below this.
    pub vocab_size: usize,
    /// Hash of the tokenizer (hex), when the dataset records it.
    pub tokenizer_hash: Option<String>,
    /// The token between documents, when the dataset records it.
    pub end_of_document: Option<u32>,
}

impl ShardSet {
    /// Opens a dataset: a folder with a `manifest.json`, a folder of llm.c `.bin` shards, or one
    /// shard file.
    pub fn open(path: &Path) -> Result<ShardSet, Error> {
        if path.is_file() {
            let s = TokenShard::open(path)?;
            return Ok(ShardSet {
                vocab_size: s.vocab_size,
                tokenizer_hash: s.tokenizer_hash.map(hex),
                train: vec![s],
                val: Vec::new(),
                end_of_document: None,
            });
        }
        if path.join(MANIFEST).exists() {
            return Self::open_manifest(path);
        }
        let mut files = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err(path))? {
            let p = e.map_err(io_err(path))?.path();
            if p.extension().is_some_and(|x| x == "bin") && p.is_file() {
                files.push(p);
            }
        }
        if files.is_empty() {
            return Err(bad(format!(
                "{}: neither {MANIFEST} nor .bin shards",
                path.display()
            )));
        }
        files.sort();
        let mut set = ShardSet {
            train: Vec::new(),
            val: Vec::new(),
            vocab_size: 0,
            tokenizer_hash: None,
            end_of_document: None,
        };
        for f in files {
            let s = TokenShard::open(&f)?;
            set.vocab_size = set.vocab_size.max(s.vocab_size);
            let is_val = f
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("val"));
            if is_val { &mut set.val } else { &mut set.train }.push(s);
        }
        Ok(set)
    }

    fn open_manifest(dir: &Path) -> Result<ShardSet, Error> {
        let m = Manifest::read(dir)?;
        let want_hash = parse_hex(&m.tokenizer.hash);
        let mut set = ShardSet {
            train: Vec::new(),
            val: Vec::new(),
            vocab_size: m.tokenizer.vocab_size,
            tokenizer_hash: Some(m.tokenizer.hash.clone()),
            end_of_document: Some(m.end_of_document),
        };
        for e in &m.shards {
            let s = TokenShard::open(&dir.join(&e.file))?;
            let mismatch = |what: &str| {
                Err(bad(format!(
                    "{}: its {what} disagrees with {MANIFEST}",
                    dir.join(&e.file).display()
                )))
            };
            if s.len != e.tokens {
                return mismatch("token count");
            }
            if s.dtype != m.dtype {
                return mismatch("dtype");
            }
            if s.kind == ShardKind::Swarm
                && (s.tokenizer_hash != want_hash || s.vocab_size != m.tokenizer.vocab_size)
            {
                return mismatch("tokenizer");
            }
            match e.split {
                Split::Train => set.train.push(s),
                Split::Val => set.val.push(s),
            }
        }
        Ok(set)
    }
}

/// Lower-case hex of a hash.
pub fn hex(h: [u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Hash that identifies a tokenizer: BLAKE3 of its tokenizer.json bytes.
pub fn tokenizer_hash(json: &[u8]) -> [u8; 32] {
    *blake3::hash(json).as_bytes()
}

/// Writes one of our shards: to `NAME.tmp`, renamed to `NAME` by [`ShardWriter::finish`] once
/// complete, so a crash never leaves a partial shard under its final name.
pub struct ShardWriter {
    file: std::io::BufWriter<std::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    header: ShardHeader,
    buf: Vec<u8>,
}

impl ShardWriter {
    /// Starts a shard at `path` (written to a temporary file until finished) for ids of `dtype` below `vocab_size`, made with the tokenizer of `tokenizer_hash`.
    pub fn create(
        path: &Path,
        dtype: Dtype,
        vocab_size: u32,
        tokenizer_hash: [u8; 32],
    ) -> Result<Self, Error> {
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let header = ShardHeader {
            dtype,
            tokens: 0,
            vocab_size,
            tokenizer_hash,
        };
        let mut file = std::io::BufWriter::with_capacity(1 << 20, file);
        file.write_all(&header.encode()).map_err(io_err(&tmp))?;
        Ok(ShardWriter {
            file,
            tmp,
            path: path.to_path_buf(),
            header,
            buf: Vec::new(),
        })
    }

    /// Tokens written so far.
    pub fn len(&self) -> u64 {
        self.header.tokens
    }

    /// Whether no token was written.
    pub fn is_empty(&self) -> bool {
        self.header.tokens == 0
    }

    /// Appends tokens; ids must be below the vocabulary.
    pub fn write(&mut self, ids: &[u32]) -> Result<(), Error> {
        if let Some(&id) = ids.iter().find(|&&i| i >= self.header.vocab_size) {
            return Err(bad(format!(
                "token id {id} outside the vocabulary of {}",
                self.header.vocab_size
            )));
        }
        self.buf.clear();
        match self.header.dtype {
            Dtype::U16 => ids
                .iter()
                .for_each(|&i| self.buf.extend_from_slice(&(i as u16).to_le_bytes())),
            Dtype::U32 => ids
                .iter()
                .for_each(|&i| self.buf.extend_from_slice(&i.to_le_bytes())),
        }
        self.file.write_all(&self.buf).map_err(io_err(&self.tmp))?;
        self.header.tokens += ids.len() as u64;
        Ok(())
    }

    /// Writes the final header, syncs and renames into place; returns the token count.
    pub fn finish(self) -> Result<u64, Error> {
        let e = io_err(&self.tmp);
        let mut file = self
            .file
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(&e)?;
        file.seek(SeekFrom::Start(0)).map_err(&e)?;
        file.write_all(&self.header.encode()).map_err(&e)?;
        file.sync_all().map_err(&e)?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        Ok(self.header.tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(ids: &[u32], dtype: Dtype, vocab: u32) -> Vec<u8> {
        let mut b = ShardHeader {
            dtype,
            tokens: ids.len() as u64,
            vocab_size: vocab,
            tokenizer_hash: [7; 32],
        }
        .encode()
        .to_vec();
        for &i in ids {
            match dtype {
                Dtype::U16 => b.extend_from_slice(&(i as u16).to_le_bytes()),
                Dtype::U32 => b.extend_from_slice(&i.to_le_bytes()),
            }
        }
        b
    }

    fn llmc(ids: &[u16], magic: i32, version: i32, count: i32) -> Vec<u8> {
        let mut h = vec![0i32; 256];
        (h[0], h[1], h[2]) = (magic, version, count);
        let mut b: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
        b.extend(ids.iter().flat_map(|x| x.to_le_bytes()));
        b
    }

    fn read_all(s: &TokenShard) -> Vec<u32> {
        let mut v = Vec::new();
        s.read(0, s.len() as usize, &mut v).unwrap();
        v
    }

    #[test]
    fn our_shards_round_trip_in_both_widths() {
        for (dtype, vocab) in [(Dtype::U16, 50_000), (Dtype::U32, 100_000)] {
            let ids: Vec<u32> = (0..1000).map(|i| (i * 97) % vocab).collect();
            let s = TokenShard::from_bytes(ours(&ids, dtype, vocab), "t").unwrap();
            assert_eq!(
                (s.len(), s.dtype(), s.kind()),
                (1000, dtype, ShardKind::Swarm)
            );
            assert_eq!(read_all(&s), ids);
            let mut part = Vec::new();
            s.read(990, 10, &mut part).unwrap();
            assert_eq!(part, ids[990..]);
            assert!(s.read(995, 10, &mut part).is_err());
            assert!(s.read(u64::MAX, 10, &mut part).is_err());
        }
    }

    #[test]
    fn writer_output_is_read_back_through_a_memory_map() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        let mut w = ShardWriter::create(&p, Dtype::U16, 300, [1; 32]).unwrap();
        w.write(&[1, 2, 299]).unwrap();
        assert!(w.write(&[300]).is_err());
        w.write(&[4]).unwrap();
        assert!(!p.exists(), "only the temporary file exists before finish");
        assert_eq!(w.finish().unwrap(), 4);
        let s = TokenShard::open(&p).unwrap();
        assert_eq!(read_all(&s), vec![1, 2, 299, 4]);
        assert_eq!(s.tokenizer_hash(), Some([1; 32]));
    }

    #[test]
    fn llmc_shards_are_read_as_they_are() {
        let s = TokenShard::from_bytes(llmc(&[50256, 1, 2], LLMC_MAGIC_GPT2, 1, 3), "l").unwrap();
        assert_eq!((s.kind(), s.vocab_size()), (ShardKind::Llmc, GPT2_VOCAB));
        assert_eq!(read_all(&s), vec![50256, 1, 2]);
        // An id above GPT-2's vocabulary is reported, not returned.
        let s = TokenShard::from_bytes(llmc(&[60000], LLMC_MAGIC_GPT2, 1, 1), "l").unwrap();
        let err = s.read(0, 1, &mut Vec::new()).unwrap_err().to_string();
        assert!(err.contains("60000"), "{err}");
    }

    #[test]
    fn malformed_shards_are_rejected_with_reasons() {
        let good = ours(&[1, 2, 3], Dtype::U16, 10);
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "not a token shard"),
            (b"SWTOKSHD".to_vec(), "shorter than the header"),
            (good[..good.len() - 1].to_vec(), "the file holds"),
            ([good.clone(), vec![0, 0]].concat(), "the file holds"),
            (llmc(&[1, 2], LLMC_MAGIC_GPT2, 1, 3), "the file holds"),
            (llmc(&[1, 2], LLMC_MAGIC_GPT2, 1, -1), "negative"),
            (llmc(&[1, 2], LLMC_MAGIC_GPT2, 3, 2), "version"),
            (llmc(&[1, 2], 12345, 1, 2), "unknown magic"),
            (
                llmc(&[1, 2], LLMC_MAGIC_GPT2, 1, 2)[..100].to_vec(),
                "shorter than llm.c",
            ),
        ];
        let mut v = good.clone();
        v[8] = 9;
        cases.push((v, "version"));
        let mut v = good.clone();
        v[12] = 3;
        cases.push((v, "width"));
        let mut v = good.clone();
        v[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push((v, "the file holds"));
        let mut v = good.clone();
        v[24..28].copy_from_slice(&70_000u32.to_le_bytes());
        cases.push((v, "does not fit"));
        for (bytes, want) in cases {
            let err = TokenShard::from_bytes(bytes, "x").unwrap_err();
            assert!(matches!(err, Error::Data(_)));
            assert!(err.to_string().contains(want), "{err} lacks {want:?}");
        }
        // Ids above the header's vocabulary are caught on read.
        let s = TokenShard::from_bytes(ours(&[1, 12, 3], Dtype::U16, 10), "x").unwrap();
        assert!(s.read(0, 3, &mut Vec::new()).is_err());
    }

    #[test]
    fn manifests_are_checked() {
        let m = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            tokenizer: TokenizerInfo {
                name: "bpe".into(),
                hash: hex([7; 32]),
                vocab_size: 10,
            },
            end_of_document: 0,
            dtype: Dtype::U16,
            shards: vec![ShardEntry {
                file: "a.bin".into(),
                tokens: 3,
                split: Split::Train,
            }],
            progress: None,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(Manifest::parse(text.as_bytes()).unwrap(), m);
        for (from, to) in [
            ("a.bin", "../a.bin"),
            ("a.bin", ".hidden"),
            ("\"end_of_document\":0", "\"end_of_document\":10"),
            ("\"vocab_size\":10", "\"vocab_size\":70000"),
            (FORMAT, "other"),
            ("\"split\":\"train\"", "\"split\":\"test\""),
            ("\"tokens\":3", "\"tokens\":-3"),
        ] {
            let t = text.replace(from, to);
            assert!(Manifest::parse(t.as_bytes()).is_err(), "accepted {t}");
        }
        // A shard that disagrees with the manifest is refused.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), ours(&[1, 2, 3], Dtype::U16, 10)).unwrap();
        m.write(dir.path()).unwrap();
        let set = ShardSet::open(dir.path()).unwrap();
        assert_eq!((set.train.len(), set.val.len(), set.vocab_size), (1, 0, 10));
        std::fs::write(dir.path().join("a.bin"), ours(&[1, 2], Dtype::U16, 10)).unwrap();
        let err = ShardSet::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("token count"), "{err}");
    }

    #[test]
    fn a_folder_of_llmc_shards_splits_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (name, ids) in [
            ("fineweb_train_000001.bin", &[1u16, 2, 3][..]),
            ("fineweb_val_000000.bin", &[4, 5]),
            ("fineweb_train_000002.bin", &[6]),
        ] {
            std::fs::write(
                dir.path().join(name),
                llmc(ids, LLMC_MAGIC_GPT2, 1, ids.len() as i32),
            )
            .unwrap();
        }
        let set = ShardSet::open(dir.path()).unwrap();
        let lens: Vec<u64> = set.train.iter().map(|s| s.len()).collect();
        assert_eq!(lens, vec![3, 1]);
        assert_eq!(read_all(&set.val[0]), vec![4, 5]);
        assert_eq!(set.vocab_size, GPT2_VOCAB);
    }
}
