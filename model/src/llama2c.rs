//! Import of llama2.c `.bin` checkpoints (Karpathy's legacy export, version 0), grouped-query
//! attention included.
//!
//! Layout: 7 little-endian i32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
//! seq_len; a negative vocab_size means the classifier is stored separately), then f32 arrays:
//! embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, two RoPE tables
//! (skipped), and the classifier when unshared. The header is validated against the config caps and
//! the exact file length before any array is read.
//!
//! llama2.c rotates adjacent pairs (interleaved RoPE) while HF Llama rotates halves; converting
//! permutes the rows of wq and wk within each head (as HF's `convert_llama_weights_to_hf.py` does).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, ModelConfig};

/// Size of the legacy header: seven i32.
pub const HEADER_BYTES: usize = 28;
/// Magic of llama2.c's newer exports ("ak42"), which we recognise to give a clear error.
const MAGIC_V1: u32 = 0x616b_3432;

/// A parsed llama2.c checkpoint, in llama2.c's own row order.
#[derive(Debug, Clone)]
pub struct Llama2c {
    /// The shape as an HF config (`rms_norm_eps` 1e-5, `rope_theta` 10000 as in llama2.c).
    pub config: ModelConfig,
    /// Weights under HF names but with llama2.c's interleaved RoPE row order in q/k projections.
    pub tensors: HashMap<String, Tensor>,
    /// The RoPE cos table, (seq_len, head_dim / 2), as stored.
    pub freq_cis_real: Tensor,
    /// The RoPE sin table, (seq_len, head_dim / 2), as stored.
    pub freq_cis_imag: Tensor,
}

fn bad(msg: String) -> Error {
    Error::Checkpoint(format!("llama2.c: {msg}"))
}

/// Reads the header into a config checked against the caps; `bool` is "classifier shared".
pub fn header_config(bytes: &[u8]) -> Result<(ModelConfig, bool), Error> {
    if bytes.len() < HEADER_BYTES {
        return Err(bad(format!(
            "{} bytes, shorter than the header",
            bytes.len()
        )));
    }
    let field = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if field(0) as u32 == MAGIC_V1 {
        return Err(bad(format!(
            "versioned export (version {}) is not supported; export with --version 0",
            field(1)
        )));
    }
    let [dim, hidden, layers, heads, kv_heads, vocab, seq_len] = std::array::from_fn(field);
    let positive = |name: &str, v: i32| {
        usize::try_from(v)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| bad(format!("{name} {v} must be positive")))
    };
    let shared = vocab > 0;
    let config = ModelConfig {
        hidden_size: positive("dim", dim)?,
        intermediate_size: positive("hidden_dim", hidden)?,
        num_hidden_layers: positive("n_layers", layers)?,
        num_attention_heads: positive("n_heads", heads)?,
        num_key_value_heads: Some(positive("n_kv_heads", kv_heads)?),
        vocab_size: positive("vocab_size", vocab.checked_abs().unwrap_or(0))?,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: positive("seq_len", seq_len)?,
        tie_word_embeddings: shared,
        subspace_rank: 0,
        subspace_seed: 0,
    };
    config.validate()?;
    Ok((config, shared))
}

/// Checks that a file of `len` bytes is exactly what `config` implies.
fn check_len(config: &ModelConfig, len: u64) -> Result<(), Error> {
    let expected = expected_len(config).ok_or_else(|| bad("sizes overflow".into()))?;
    if len != expected {
        return Err(bad(format!(
            "file is {len} bytes, the header implies {expected}"
        )));
    }
    Ok(())
}

/// [`header_config`], and the length of `bytes` (the whole file) must match it exactly.
pub fn parse_header(bytes: &[u8]) -> Result<(ModelConfig, bool), Error> {
    let (config, shared) = header_config(bytes)?;
    check_len(&config, bytes.len() as u64)?;
    Ok((config, shared))
}

/// Exact file length implied by a config (None on overflow).
fn expected_len(c: &ModelConfig) -> Option<u64> {
    let (d, h, l, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.num_hidden_layers as u64,
        c.vocab_size as u64,
    );
    let kv = (c.num_kv_heads() * c.head_dim()) as u64;
    let rope = (c.max_position_embeddings as u64).checked_mul(c.head_dim() as u64)?;
    let per_layer = d
        .checked_mul(d)?
        .checked_mul(2)?
        .checked_add(kv.checked_mul(d)?.checked_mul(2)?)?
        .checked_add(h.checked_mul(d)?.checked_mul(3)?)?
        .checked_add(2 * d)?;
    let classifier = if c.tie_word_embeddings {
        0
    } else {
        v.checked_mul(d)?
    };
    let floats = v
        .checked_mul(d)?
        .checked_add(l.checked_mul(per_layer)?)?
        .checked_add(d)?
        .checked_add(rope)?
        .checked_add(classifier)?;
    floats.checked_mul(4)?.checked_add(HEADER_BYTES as u64)
}

/// Parses a whole llama2.c file held in memory.
pub fn parse(bytes: &[u8]) -> Result<Llama2c, Error> {
    let (config, shared) = parse_header(bytes)?;
    let c = &config;
    let (d, h, l, v) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.vocab_size,
    );
    let kv = c.num_kv_heads() * c.head_dim();
    let mut pos = HEADER_BYTES;
    // The length was checked exactly against the header, so every read below is in bounds.
    let mut take = |shape: &[usize]| -> Result<Tensor, Error> {
        let n: usize = shape.iter().product();
        let raw = &bytes[pos..pos + 4 * n];
        pos += 4 * n;
        let vals: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if vals.iter().any(|x| !x.is_finite()) {
            return Err(bad("non-finite weights".into()));
        }
        Ok(Tensor::from_vec(vals, shape, &Device::Cpu)?)
    };
    let embed = take(&[v, d])?;
    let att_norm = take(&[l, d])?;
    let wq = take(&[l, d, d])?;
    let wk = take(&[l, kv, d])?;
    let wv = take(&[l, kv, d])?;
    let wo = take(&[l, d, d])?;
    let ffn_norm = take(&[l, d])?;
    let w1 = take(&[l, h, d])?;
    let w2 = take(&[l, d, h])?;
    let w3 = take(&[l, h, d])?;
    let final_norm = take(&[d])?;
    let freq_cis_real = take(&[c.max_position_embeddings, c.head_dim() / 2])?;
    let freq_cis_imag = take(&[c.max_position_embeddings, c.head_dim() / 2])?;
    let classifier = if shared { None } else { Some(take(&[v, d])?) };

    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), embed);
    for i in 0..l {
        let p = format!("model.layers.{i}");
        t.insert(format!("{p}.input_layernorm.weight"), att_norm.get(i)?);
        t.insert(format!("{p}.self_attn.q_proj.weight"), wq.get(i)?);
        t.insert(format!("{p}.self_attn.k_proj.weight"), wk.get(i)?);
        t.insert(format!("{p}.self_attn.v_proj.weight"), wv.get(i)?);
        t.insert(format!("{p}.self_attn.o_proj.weight"), wo.get(i)?);
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            ffn_norm.get(i)?,
        );
        t.insert(format!("{p}.mlp.gate_proj.weight"), w1.get(i)?);
        t.insert(format!("{p}.mlp.down_proj.weight"), w2.get(i)?);
        t.insert(format!("{p}.mlp.up_proj.weight"), w3.get(i)?);
    }
    t.insert("model.norm.weight".into(), final_norm);
    if let Some(cls) = classifier {
        t.insert("lm_head.weight".into(), cls);
    }
    Ok(Llama2c {
        config,
        tensors: t,
        freq_cis_real,
        freq_cis_imag,
    })
}

/// Permutes the rows of a q or k projection from interleaved RoPE pairs to rotated halves:
/// within each head, row `2i + a` moves to `a * head_dim / 2 + i`.
pub fn interleaved_to_halves(w: &Tensor, heads: usize) -> Result<Tensor, Error> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(bad(format!(
            "{rows} rows do not split into {heads} heads of pairs"
        )));
    }
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

impl Llama2c {
    /// The weights in HF Llama convention (q/k rows permuted to rotated halves), ready for
    /// [`crate::checkpoint::save`] or the model.
    pub fn to_hf(&self) -> Result<HashMap<String, Tensor>, Error> {
        let c = &self.config;
        let mut out = self.tensors.clone();
        for i in 0..c.num_hidden_layers {
            for (proj, heads) in [
                ("q_proj", c.num_attention_heads),
                ("k_proj", c.num_kv_heads()),
            ] {
                let name = format!("model.layers.{i}.self_attn.{proj}.weight");
                let w = &self.tensors[&name];
                out.insert(name, interleaved_to_halves(w, heads)?);
            }
        }
        Ok(out)
    }
}

/// Largest llama2.c file we read (the 7B export is ~27 GB; larger is certainly not a checkpoint).
pub const MAX_FILE_BYTES: u64 = 32 << 30;

/// Reads a llama2.c `.bin` file and returns its config and HF-convention weights.
pub fn import(path: &Path) -> Result<(ModelConfig, HashMap<String, Tensor>), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(bad(format!("{len} bytes is too large")));
    }
    // Check the header against the file length before reading the arrays.
    let mut head = [0u8; HEADER_BYTES];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(io)?;
        if let Err(e) = f.read_exact(&mut head) {
            return Err(match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    bad(format!("{len} bytes, shorter than the header"))
                }
                _ => io(e),
            });
        }
    }
    let (cfg, _) = header_config(&head)?;
    check_len(&cfg, len)?;
    let bytes = std::fs::read(path).map_err(io)?;
    let parsed = parse(&bytes)?;
    Ok((parsed.config.clone(), parsed.to_hf()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A llama2.c file with the given header fields and weights k * 1e-3 for the k-th float.
    pub(crate) fn synthetic(header: [i32; 7]) -> Vec<u8> {
        let mut out: Vec<u8> = header.iter().flat_map(|x| x.to_le_bytes()).collect();
        let (cfg, _) = header_config(&out).unwrap();
        let floats = (expected_len(&cfg).unwrap() as usize - HEADER_BYTES) / 4;
        for k in 0..floats {
            out.extend(((k % 1000) as f32 * 1e-3 - 0.5).to_le_bytes());
        }
        out
    }

    const TINY: [i32; 7] = [16, 24, 2, 4, 2, 40, 8];

    #[test]
    fn parses_shared_and_unshared_classifiers() {
        let f = parse(&synthetic(TINY)).unwrap();
        assert!(f.config.tie_word_embeddings);
        assert_eq!(f.config.num_kv_heads(), 2);
        assert_eq!(
            f.tensors["model.layers.1.self_attn.k_proj.weight"].dims(),
            &[8, 16]
        );
        assert!(!f.tensors.contains_key("lm_head.weight"));
        let mut h = TINY;
        h[5] = -40;
        let f = parse(&synthetic(h)).unwrap();
        assert!(!f.config.tie_word_embeddings);
        assert_eq!(f.tensors["lm_head.weight"].dims(), &[40, 16]);
        // The classifier is the last array: its first value is float number (total - v*d).
        let n = f.tensors.len();
        assert_eq!(n, 1 + 2 * 9 + 1 + 1);
        let hf = f.to_hf().unwrap();
        let names: std::collections::HashSet<_> = hf.keys().cloned().collect();
        let want: std::collections::HashSet<_> = crate::checkpoint::expected_tensors(&f.config)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, want);
    }

    #[test]
    fn rejects_truncated_extended_and_hostile_headers() {
        let good = synthetic(TINY);
        assert!(matches!(
            parse(&good[..good.len() - 4]),
            Err(Error::Checkpoint(_))
        ));
        let mut longer = good.clone();
        longer.extend([0u8; 4]);
        assert!(matches!(parse(&longer), Err(Error::Checkpoint(_))));
        assert!(matches!(parse(&good[..10]), Err(Error::Checkpoint(_))));
        // Huge dims: rejected by the caps or the length check, never allocated.
        for hostile in [
            [i32::MAX, 24, 2, 4, 2, 40, 8],
            [16, 24, i32::MAX, 4, 2, 40, 8],
            [16, 24, 2, 4, 2, i32::MIN, 8],
            [16, 24, 2, 4, 2, 40, i32::MAX],
            [16, 24, 2, 4, 3, 40, 8],
            [16, 24, 2, 0, 2, 40, 8],
            [65536, 262144, 1024, 2, 2, 2_000_000, 1_000_000],
        ] {
            let mut bytes: Vec<u8> = hostile.iter().flat_map(|x| x.to_le_bytes()).collect();
            bytes.extend(&good[HEADER_BYTES..]);
            let err = parse(&bytes).unwrap_err();
            assert!(
                matches!(err, Error::Checkpoint(_) | Error::Config(_)),
                "{hostile:?}: {err}"
            );
        }
        let mut v1 = good.clone();
        v1[..4].copy_from_slice(&MAGIC_V1.to_le_bytes());
        let err = parse(&v1).unwrap_err().to_string();
        assert!(err.contains("version"), "{err}");
        let mut nan = good.clone();
        nan[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(parse(&nan), Err(Error::Checkpoint(_))));
    }

    #[test]
    fn permutation_moves_pairs_to_halves() {
        // One head of dim 4 (two pairs) and two input columns; row r holds r.
        let w =
            Tensor::from_vec(vec![0f32, 0., 1., 1., 2., 2., 3., 3.], (4, 2), &Device::Cpu).unwrap();
        let p = interleaved_to_halves(&w, 1).unwrap();
        // Pairs (0,1), (2,3) become halves [0, 2 | 1, 3].
        assert_eq!(
            p.to_vec2::<f32>().unwrap(),
            vec![vec![0., 0.], vec![2., 2.], vec![1., 1.], vec![3., 3.]]
        );
        let w2 = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p2 = interleaved_to_halves(&w2, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(p2, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert!(interleaved_to_halves(&w2, 3).is_err());
    }

    #[test]
    fn import_checks_the_file_before_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        std::fs::write(&path, synthetic(TINY)).unwrap();
        let (cfg, w) = import(&path).unwrap();
        assert_eq!(cfg.hidden_size, 16);
        assert_eq!(w.len(), crate::checkpoint::expected_tensors(&cfg).len());
        std::fs::write(&path, &synthetic(TINY)[..100]).unwrap();
        assert!(matches!(import(&path), Err(Error::Checkpoint(_))));
        std::fs::write(&path, [1u8, 2, 3]).unwrap();
        assert!(matches!(import(&path), Err(Error::Checkpoint(_))));
        assert!(matches!(
            import(&dir.path().join("none.bin")),
            Err(Error::Io { .. })
        ));
    }
}
