//! [`Encoder`]: runs a [`Codec`] over `&[f32]`, writing a frame into a reusable buffer.

use crate::codec::{Codec, Values};
use crate::decoder::{self, Sections};
use crate::error::{Error, Result};
use crate::frame::{self, HeaderFields, IndexCoding, MAX_DIMS};
use crate::{index, quant, rotate, topk};

/// Default rotation seed; any fixed value works, what matters is that it travels in the frame.
pub const DEFAULT_SEED: u64 = 0x5357_4152_4d5f_5248; // "SWARM_RH"

/// Encodes tensors with one codec, keeping scratch space between calls.
///
/// After the first call for the largest tensor, [`Encoder::encode`] allocates nothing (given an
/// `out` buffer that is reused too). One encoder per stream and thread; it is `Send`.
pub struct Encoder {
    codec: Codec,
    seed: u64,
    topk: topk::Scratch,
    positions: Vec<u32>,
    vals: Vec<f32>,
    codes: Vec<u8>,
    raw: Vec<u8>,
    /// Row dedup: row hash -> distinct row number, and each distinct row's first row index
    /// (capacities reused).
    rows: std::collections::HashMap<u64, u32>,
    firsts: Vec<u32>,
    /// Scratch of [`Encoder::encode_decoded`].
    decode: decoder::Scratch,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("codec", &self.codec.to_string())
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder for `codec` (validated) with the default rotation seed.
    pub fn new(codec: Codec) -> Result<Encoder> {
        codec.validate()?;
        let zstd = match codec.zstd {
            Some(level) => {
                Some(zstd::bulk::Compressor::new(level).map_err(|e| Error::Zstd(e.to_string()))?)
            }
            None => None,
        };
        Ok(Encoder {
            codec,
            seed: DEFAULT_SEED,
            topk: topk::Scratch::default(),
            positions: Vec::new(),
            vals: Vec::new(),
            codes: Vec::new(),
            raw: Vec::new(),
            rows: std::collections::HashMap::new(),
            firsts: Vec::new(),
            decode: decoder::Scratch::default(),
            zstd,
        })
    }

    /// Sets the seed of the randomized Hadamard rotation (written into each frame). Replicas that
    /// must produce identical bytes use the same seed, e.g. one derived from the run's seed.
    pub fn with_seed(mut self, seed: u64) -> Encoder {
        self.seed = seed;
        self
    }

    /// The codec this encoder runs.
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// Encodes `data` (of the given `shape`, row-major) as one frame, replacing the contents of
    /// `out`. The bytes are a pure function of (codec, seed, data, shape).
    ///
    /// Errors: [`Error::Shape`] if the shape does not multiply to `data.len()`, has more than
    /// [`MAX_DIMS`] dimensions, or a top-k codec gets 2^32 elements or more; [`Error::NonFinite`]
    /// if a quantizer (q8/q4/q2) meets NaN or infinity. fp32/fp16/bf16 carry non-finite values
    /// through (fp16 saturates above 65504 to infinity).
    pub fn encode(&mut self, data: &[f32], shape: &[usize], out: &mut Vec<u8>) -> Result<()> {
        self.encode_inner(data, shape, out, None)
    }

    /// [`encode`](Self::encode), and also writes into `decoded` (resized, its capacity reused) the
    /// tensor the frame decodes to, bit for bit what [`crate::Decoder`] makes of it: decoded by
    /// the decoder's own code from the sections before zstd, which saves error feedback the
    /// decompression, the checksum and a copy of the frame. `decoded` is unspecified after an
    /// error.
    pub fn encode_decoded(
        &mut self,
        data: &[f32],
        shape: &[usize],
        out: &mut Vec<u8>,
        decoded: &mut Vec<f32>,
    ) -> Result<()> {
        self.encode_inner(data, shape, out, Some(decoded))
    }

    fn encode_inner(
        &mut self,
        data: &[f32],
        shape: &[usize],
        out: &mut Vec<u8>,
        decoded: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let n = data.len();
        let product = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if shape.len() > MAX_DIMS
            || product != Some(n)
            || (self.codec.topk.is_some() && n > u32::MAX as usize)
        {
            return Err(Error::Shape {
                shape: shape.to_vec(),
                len: n,
                max_dims: MAX_DIMS,
            });
        }
        let codec = self.codec;

        // 1. Which elements: positions (top-k) or all.
        let index_coding;
        let sparse = match codec.topk {
            Some(t) => {
                self.positions.clear();
                self.vals.clear();
                let (s, pos, vals) = (&mut self.topk, &mut self.positions, &mut self.vals);
                if t.per_row {
                    let row = shape.last().copied().unwrap_or(n);
                    if row > 0 {
                        let k = t.k_of(row);
                        // Rows of one tensor look alike: each row's k-th magnitude is a good
                        // first threshold for the next.
                        let mut hint = 0;
                        for (r, chunk) in data.chunks_exact(row).enumerate() {
                            let off = (r * row) as u32;
                            let kth = topk::select(chunk, k, off, hint, s, pos, vals);
                            hint = topk::next_hint(kth);
                        }
                    }
                } else {
                    topk::select(data, t.k_of(n), 0, 0, s, pos, vals);
                }
                debug_assert_eq!(self.positions.len(), frame::kept_count(&t, n, shape));
                true
            }
            None if codec.dedup => self.dedup_rows(data, shape),
            None => false,
        };
        let kept = if sparse { self.vals.len() } else { n };
        let index_len = if sparse && codec.dedup {
            index_coding = IndexCoding::RowMap;
            self.positions.len() * frame::row_map_width(kept / shape[shape.len() - 1])
        } else if sparse {
            let bitmap = index::bitmap_size(n);
            // A gap takes at least a byte: with as many kept as the bitmap has bytes, the
            // varints cannot be smaller, and sizing them (a pass over every position, half the
            // encoder's own time on the sync's `topk:0.9`) is skipped. The same choice either way.
            let varint = if self.positions.len() >= bitmap {
                usize::MAX
            } else {
                index::varint_size(&self.positions)
            };
            if varint < bitmap {
                index_coding = IndexCoding::DeltaVarint;
                varint
            } else {
                index_coding = IndexCoding::Bitmap;
                bitmap
            }
        } else {
            index_coding = IndexCoding::Dense;
            0
        };

        // 2. Rotation works in place, so dense input is copied first.
        if codec.rotate {
            if !sparse {
                self.vals.clear();
                self.vals.extend_from_slice(data);
            }
            if let Values::Quant { block, .. } = codec.values {
                rotate::forward(&mut self.vals, block as usize, self.seed);
            }
        }
        let vals: &[f32] = if sparse || codec.rotate {
            &self.vals
        } else {
            data
        };

        // 3. Sections: index, scales, values; straight into `out` unless zstd follows.
        let scales_len = frame::scales_section_len(codec.values, kept).expect("n < 2^62 elements");
        let values_len = frame::values_section_len(codec.values, kept).expect("n < 2^62 elements");
        let header_len = frame::write_header(
            out,
            &HeaderFields {
                codec: &codec,
                seed: self.seed,
                shape,
                elements: n,
                kept,
                index: index_coding,
                index_len,
                scales_len,
                values_len,
            },
        );
        let raw_len = index_len + scales_len + values_len;
        let raw: &mut Vec<u8> = if codec.zstd.is_some() {
            &mut self.raw
        } else {
            out
        };
        let start = if codec.zstd.is_some() { 0 } else { header_len };
        raw.truncate(start);
        raw.resize(start + raw_len, 0);
        let (idx, rest) = raw[start..].split_at_mut(index_len);
        let (scales, values) = rest.split_at_mut(scales_len);
        match index_coding {
            IndexCoding::Dense => {}
            IndexCoding::Bitmap => index::write_bitmap(&self.positions, idx),
            IndexCoding::DeltaVarint => index::write_varint(&self.positions, idx),
            IndexCoding::RowMap => {
                let w = index_len / self.positions.len().max(1);
                for (d, &r) in idx.chunks_exact_mut(w).zip(&self.positions) {
                    d.copy_from_slice(&r.to_le_bytes()[..w]);
                }
            }
        }
        if quant::encode(vals, codec.values, scales, values, &mut self.codes).is_err() {
            return Err(quant::non_finite_error(vals, &codec));
        }
        if let Some(decoded) = decoded {
            decoded.truncate(n);
            decoded.resize(n, 0.0);
            let sections = Sections {
                codec: &codec,
                seed: self.seed,
                shape,
                kept,
                index: index_coding,
                idx,
                scales,
                values,
            };
            sections.decode(&mut self.decode, decoded, false)?;
        }

        // 4. zstd: the index, then scales and values, as two frames (see the frame docs).
        let mut zstd_index_len = 0;
        if let Some(z) = self.zstd.as_mut() {
            let (idx, rest) = self.raw.split_at(index_len);
            let bound = |len: usize| {
                if len == 0 {
                    0
                } else {
                    zstd::zstd_safe::compress_bound(len)
                }
            };
            out.resize(header_len + bound(idx.len()) + bound(rest.len()), 0);
            let mut at = header_len;
            for (part, is_index) in [(idx, true), (rest, false)] {
                if part.is_empty() {
                    continue;
                }
                let written = z
                    .compress_to_buffer(part, &mut out[at..])
                    .map_err(|e| Error::Zstd(e.to_string()))?;
                if is_index {
                    zstd_index_len = written;
                }
                at += written;
            }
            out.truncate(at);
        }
        frame::seal(out, header_len, zstd_index_len);
        Ok(())
    }

    /// Row dedup: fills `positions` with each row's distinct-row number (first-appearance order)
    /// and `vals` with the distinct rows. Returns false (send dense) when no row repeats; rows are
    /// then never copied, since that is every activation frame but the embedding's.
    fn dedup_rows(&mut self, data: &[f32], shape: &[usize]) -> bool {
        let w = shape.last().copied().unwrap_or(1);
        if w == 0 || data.len() / w < 2 || data.len() / w > u32::MAX as usize {
            return false;
        }
        let row = |r: u32| &data[r as usize * w..(r as usize + 1) * w];
        self.rows.clear();
        self.positions.clear();
        self.firsts.clear();
        for (r, this) in data.chunks_exact(w).enumerate() {
            let key = row_hash(this);
            let same = |d: u32| {
                let first = row(self.firsts[d as usize]);
                first
                    .iter()
                    .zip(this)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            };
            match self.rows.get(&key) {
                Some(&d) if same(d) => self.positions.push(d),
                hit => {
                    // A hash collision with a different row: send this row as a new one (correct,
                    // merely not deduplicated against later copies).
                    let d = self.firsts.len() as u32;
                    if hit.is_none() {
                        self.rows.insert(key, d);
                    }
                    self.positions.push(d);
                    self.firsts.push(r as u32);
                }
            }
        }
        if self.firsts.len() == self.positions.len() {
            return false;
        }
        self.vals.clear();
        for &r in &self.firsts {
            self.vals.extend_from_slice(row(r));
        }
        true
    }
}

/// A fast, fixed (so deterministic on every peer) hash of a row's bits: FxHash's multiply-rotate
/// over 64-bit words (two values each) in four independent lanes, so that the multiplies
/// overlap instead of waiting on each other. Collisions cost only dedup, never correctness: rows
/// are compared on a hit. Runs over every row of every activation frame.
fn row_hash(row: &[f32]) -> u64 {
    const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    let step = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
    let word = |p: &[f32]| p[0].to_bits() as u64 | (p[1].to_bits() as u64) << 32;
    let mut lanes = [row.len() as u64, 1, 2, 3];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, p) in lanes.iter_mut().zip(c.chunks_exact(2)) {
            *l = step(*l, word(p));
        }
    }
    let mut h = lanes.into_iter().fold(0, step);
    for x in tail {
        h = step(h, x.to_bits() as u64);
    }
    h
}
