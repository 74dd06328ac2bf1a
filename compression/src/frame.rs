//! The self-describing frame: what a peer sends and what [`crate::Decoder`] accepts.
//!
//! # Layout (version 1, all integers little-endian)
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `b"SWCF"` |
//! | 4 | 1 | version, `1` |
//! | 5 | 1 | `ndim`, number of shape dimensions, `0..=8` |
//! | 6 | 1 | top-k mode: `0` none, `1` per tensor, `2` per row (last dimension), `3` row dedup (no top-k) |
//! | 7 | 1 | value coding: `0` fp32, `1` fp16, `2` bf16, `3` q8, `4` q4, `5` q2, `6` q3, `7` q5, `8` q6, `9` q7 |
//! | 8 | 1 | flags: bit 0 rotation (rht), bit 1 zstd, bits 2-3 index coding (`0` dense, `1` bitmap, `2` delta varint, `3` row map); other bits zero |
//! | 9 | 1 | zstd level as `i8` (`0` without zstd) |
//! | 10 | 2 | reserved, zero |
//! | 12 | 4 | quantizer block size `u32` (`0` for fp32/fp16/bf16) |
//! | 16 | 4 | top-k fraction, `f32` bits (`0` without top-k) |
//! | 20 | 4 | checksum: CRC-32 (IEEE) of bytes `[0, 20)`, then `[24, header_len)`, then the payload |
//! | 24 | 8 | rotation seed `u64` (`0` without rotation) |
//! | 32 | 8 | element count `u64` (product of the shape) |
//! | 40 | 8 | kept count `u64`: values sent (= element count without top-k) |
//! | 48 | 8 | index section length `u64` (bytes, before zstd) |
//! | 56 | 8 | scales section length `u64` (bytes, before zstd) |
//! | 64 | 8 | values section length `u64` (bytes, before zstd) |
//! | 72 | 8 | payload length `u64`: bytes after the header (zstd output when compressed) |
//! | 80 | 8 | compressed index length `u64`: with zstd, bytes of the payload holding the index (`0` without zstd or without an index) |
//! | 88 | 8 × ndim | shape, `u64` per dimension |
//!
//! `header_len = 88 + 8 × ndim`; the frame is exactly `header_len + payload length` bytes.
//!
//! The payload is the index section, then the scales section, then the values section. With zstd
//! (flag bit 1) the index is one zstd frame and the scales and values together another, each
//! present only when its raw part is not empty: positions and quantized values have different
//! statistics, and separate entropy tables make the pair about 7% smaller than one stream.
//! - Index: empty when dense. Bitmap: `ceil(count / 8)` bytes, bit `i % 8` of byte `i / 8` set when
//!   element `i` is kept, padding bits zero. Delta varint: one unsigned LEB128 per kept element, the
//!   gap `pos - prev - 1` from the previous kept position (`prev = -1` at the start). Row map (row
//!   dedup only, and only when some row repeats; a frame without repeats is dense): with `w` the
//!   last dimension, `rows = count / w` and `u = kept / w` distinct rows (`1 <= u < rows`), one
//!   `u16` per row when `u <= 65536`, else one `u32`: the distinct row it equals, numbered in order
//!   of first appearance (so entry `r` is at most one more than every entry before it). The values
//!   are the `u` distinct rows in that order.
//! - Scales: one fp32 per block of `block` kept values (the last block may be short); value
//!   `q × scale`.
//! - Values, in increasing position order: fp32, fp16 or bf16 (2 bytes each); q8: one `i8`; q4: two
//!   per byte, low nibble first, nibble = `q + 8`; q2: four per byte, low bits first, code `c` means
//!   `(2c - 3) × scale`. Padding bits of the last byte are zero. q3, q5, q6, q7: one `i8` each, in
//!   `-(2^(N-1) - 1)..=2^(N-1) - 1` (a code outside is corrupt).
//! - With rotation, every full block of quantized values was multiplied by `H·D / sqrt(block)`
//!   (`H` Walsh-Hadamard, `D` random signs from the seed) before quantization; a short last block
//!   is not rotated.
//!
//! Every field is checked against every other before anything is allocated: element count
//! against the caller's [`Limits`] and the shape, kept count against the top-k fraction, section
//! lengths against the codec, payload length against the frame length.

use crate::codec::{Codec, MAX_BLOCK, TopK, Values};
use crate::error::{Error, Result};

/// Bits of the quantized value codings `3..=9` (byte 7), in order.
const CODING_BITS: [u8; 7] = [8, 4, 2, 3, 5, 6, 7];

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SWCF";
/// The frame version this build writes and reads.
pub const VERSION: u8 = 1;
/// Most dimensions a frame's shape can have.
pub const MAX_DIMS: usize = 8;
/// Bytes of the header before the shape.
pub const FIXED_HEADER_LEN: usize = 88;

const CHECKSUM_AT: usize = 20;

/// What a decoder is willing to accept from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest element count accepted; the decoder allocates at most a few bytes per element.
    pub max_elements: usize,
}

impl Limits {
    /// Accept at most `max_elements` elements.
    pub const fn new(max_elements: usize) -> Limits {
        Limits { max_elements }
    }
}

impl Default for Limits {
    /// 64 Mi elements (256 MiB of fp32): above any tensor of the models this project trains on home
    /// machines, far below what would exhaust memory. Callers that know the shape should pass it.
    fn default() -> Limits {
        Limits::new(1 << 26)
    }
}

/// How the positions of kept values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexCoding {
    /// No top-k: every element is sent, in order.
    Dense,
    /// One bit per element.
    Bitmap,
    /// One LEB128 gap per kept element.
    DeltaVarint,
    /// Row dedup: one distinct-row number per row (see the module docs).
    RowMap,
}

/// Bytes of one row-map entry for `distinct` distinct rows.
pub(crate) fn row_map_width(distinct: usize) -> usize {
    if distinct <= 1 << 16 { 2 } else { 4 }
}

/// Everything a frame's header says, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameInfo {
    /// The codec that made the frame.
    pub codec: Codec,
    /// Seed of the randomized Hadamard rotation (0 without rotation).
    pub seed: u64,
    /// Number of elements of the tensor.
    pub elements: usize,
    /// Number of values sent.
    pub kept: usize,
    /// How positions are written.
    pub index: IndexCoding,
    /// Total frame length in bytes.
    pub frame_len: usize,
    shape: [usize; MAX_DIMS],
    ndim: usize,
    pub(crate) header_len: usize,
    pub(crate) index_len: usize,
    pub(crate) scales_len: usize,
    pub(crate) values_len: usize,
    pub(crate) zstd_index_len: usize,
    pub(crate) checksum: u32,
}

impl FrameInfo {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape[..self.ndim]
    }

    /// Bytes of the raw (uncompressed) payload: index + scales + values.
    pub fn raw_payload_len(&self) -> usize {
        self.index_len + self.scales_len + self.values_len
    }

    /// Compression ratio against fp32.
    pub fn ratio(&self) -> f64 {
        (self.elements as f64 * 4.0) / self.frame_len as f64
    }

    /// Reads and validates the header of `frame` (not the checksum, which needs the payload: the
    /// decoder checks it). Allocates nothing.
    pub fn read(frame: &[u8], limits: &Limits) -> Result<FrameInfo> {
        read_header(frame, limits)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn to_usize(v: u64, what: &'static str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::Inconsistent(what))
}

/// Bytes of the values section for `kept` values.
pub(crate) fn values_section_len(values: Values, kept: usize) -> Option<usize> {
    match values {
        Values::F32 => kept.checked_mul(4),
        Values::F16 | Values::Bf16 => kept.checked_mul(2),
        Values::Quant { bits, .. } => Some(
            kept.checked_mul(crate::codec::stored_bits(bits) as usize)?
                .div_ceil(8),
        ),
    }
}

/// Bytes of the scales section for `kept` values.
pub(crate) fn scales_section_len(values: Values, kept: usize) -> Option<usize> {
    match values {
        Values::Quant { block, .. } => kept.div_ceil(block as usize).checked_mul(4),
        _ => Some(0),
    }
}

/// Number of values a top-k codec keeps of a tensor of this shape.
pub(crate) fn kept_count(topk: &TopK, elements: usize, shape: &[usize]) -> usize {
    if topk.per_row {
        let row = shape.last().copied().unwrap_or(elements);
        if row == 0 {
            return 0;
        }
        (elements / row) * topk.k_of(row)
    } else {
        topk.k_of(elements)
    }
}

/// Longest LEB128 encoding of a `u64`.
pub(crate) const MAX_VARINT: usize = 10;

fn read_header(frame: &[u8], limits: &Limits) -> Result<FrameInfo> {
    if frame.len() < FIXED_HEADER_LEN {
        if frame.len() >= 4 && frame[..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        return Err(Error::Truncated {
            needed: FIXED_HEADER_LEN,
            have: frame.len(),
        });
    }
    if frame[..4] != MAGIC {
        return Err(Error::BadMagic);
    }
    if frame[4] != VERSION {
        return Err(Error::UnsupportedVersion(frame[4]));
    }
    let ndim = frame[5] as usize;
    if ndim > MAX_DIMS {
        return Err(Error::Inconsistent("more than 8 dimensions"));
    }
    let header_len = FIXED_HEADER_LEN + 8 * ndim;
    if frame.len() < header_len {
        return Err(Error::Truncated {
            needed: header_len,
            have: frame.len(),
        });
    }
    let flags = frame[8];
    if flags & !0b1111 != 0 {
        return Err(Error::Inconsistent("unknown flag bits"));
    }
    if frame[10] != 0 || frame[11] != 0 {
        return Err(Error::Inconsistent("reserved bytes are not zero"));
    }
    let rotate = flags & 1 != 0;
    let zstd_on = flags & 2 != 0;
    let index = match (flags >> 2) & 0b11 {
        0 => IndexCoding::Dense,
        1 => IndexCoding::Bitmap,
        2 => IndexCoding::DeltaVarint,
        _ => IndexCoding::RowMap,
    };
    let level = frame[9] as i8 as i32;
    let zstd = match (zstd_on, level) {
        (false, 0) => None,
        (false, _) => return Err(Error::Inconsistent("zstd level without zstd")),
        (true, l) => Some(l),
    };
    let block = u32_at(frame, 12);
    let values = match (frame[7], block) {
        (0, 0) => Values::F32,
        (1, 0) => Values::F16,
        (2, 0) => Values::Bf16,
        (3..=9, b) if (1..=MAX_BLOCK).contains(&b) => Values::Quant {
            bits: CODING_BITS[(frame[7] - 3) as usize],
            block: b,
        },
        (0..=9, _) => {
            return Err(Error::Inconsistent(
                "block size does not fit the value coding",
            ));
        }
        _ => return Err(Error::Inconsistent("unknown value coding")),
    };
    let fraction = f32::from_bits(u32_at(frame, 16));
    let dedup = frame[6] == 3;
    let topk = match frame[6] {
        0 | 3 if fraction.to_bits() == 0 => None,
        0 | 3 => return Err(Error::Inconsistent("top-k fraction without top-k")),
        1 | 2 => Some(TopK {
            fraction,
            per_row: frame[6] == 2,
        }),
        _ => return Err(Error::Inconsistent("unknown top-k mode")),
    };
    let codec = Codec {
        topk,
        dedup,
        rotate,
        values,
        zstd,
    };
    codec
        .validate()
        .map_err(|_| Error::Inconsistent("codec parameters out of range"))?;
    let seed = u64_at(frame, 24);
    if !rotate && seed != 0 {
        return Err(Error::Inconsistent("rotation seed without rotation"));
    }
    let declared = u64_at(frame, 32);
    if declared > limits.max_elements as u64 {
        return Err(Error::TooLarge {
            declared,
            limit: limits.max_elements,
        });
    }
    let elements = to_usize(declared, "element count")?;
    let mut shape = [0usize; MAX_DIMS];
    let mut product: u64 = 1;
    for (d, slot) in shape.iter_mut().enumerate().take(ndim) {
        let v = u64_at(frame, FIXED_HEADER_LEN + 8 * d);
        product = product
            .checked_mul(v)
            .ok_or(Error::Inconsistent("shape product overflows"))?;
        *slot = to_usize(v, "shape")?;
    }
    if product != declared {
        return Err(Error::Inconsistent(
            "shape product differs from element count",
        ));
    }
    if topk.is_some() && elements > u32::MAX as usize {
        return Err(Error::Inconsistent(
            "top-k frames hold at most 2^32 - 1 elements",
        ));
    }
    let kept = to_usize(u64_at(frame, 40), "kept count")?;
    // Row dedup: the row width and the numbers of rows and of distinct rows.
    let width = if ndim == 0 { 1 } else { shape[ndim - 1] };
    let (rows, distinct) = match width {
        0 => (0, 0),
        w => (elements / w, kept / w),
    };
    let kept_ok = match (&topk, index) {
        (None, IndexCoding::Dense) => kept == elements,
        (None, IndexCoding::RowMap) => {
            dedup
                && width > 0
                && kept.is_multiple_of(width)
                && distinct >= 1
                && distinct < rows
                && rows <= u32::MAX as usize
        }
        (Some(t), IndexCoding::Bitmap | IndexCoding::DeltaVarint) => {
            kept == kept_count(t, elements, &shape[..ndim])
        }
        _ => {
            return Err(Error::Inconsistent(
                "index coding does not fit the top-k mode",
            ));
        }
    };
    if !kept_ok {
        return Err(Error::Inconsistent(
            "kept count does not follow from the codec and shape",
        ));
    }
    let index_len = to_usize(u64_at(frame, 48), "index length")?;
    let scales_len = to_usize(u64_at(frame, 56), "scales length")?;
    let values_len = to_usize(u64_at(frame, 64), "values length")?;
    let payload_len = to_usize(u64_at(frame, 72), "payload length")?;
    let zstd_index_len = to_usize(u64_at(frame, 80), "compressed index length")?;
    let index_ok = match index {
        IndexCoding::Dense => index_len == 0,
        IndexCoding::Bitmap => index_len == elements.div_ceil(8),
        IndexCoding::DeltaVarint => {
            index_len >= kept && index_len <= kept.saturating_mul(MAX_VARINT)
        }
        IndexCoding::RowMap => Some(index_len) == rows.checked_mul(row_map_width(distinct)),
    };
    if !index_ok {
        return Err(Error::Inconsistent(
            "index length does not fit the kept count",
        ));
    }
    if Some(scales_len) != scales_section_len(values, kept) {
        return Err(Error::Inconsistent(
            "scales length does not fit the kept count",
        ));
    }
    if Some(values_len) != values_section_len(values, kept) {
        return Err(Error::Inconsistent(
            "values length does not fit the kept count",
        ));
    }
    // Each is bounded by a few bytes per element, but a caller's cap may be huge: check anyway.
    let raw = index_len
        .checked_add(scales_len)
        .and_then(|r| r.checked_add(values_len))
        .ok_or(Error::Inconsistent("section lengths overflow"))?;
    if zstd.is_none() && (payload_len != raw || zstd_index_len != 0) {
        return Err(Error::Inconsistent(
            "payload length differs from the sections",
        ));
    }
    if zstd.is_some()
        && (zstd_index_len > payload_len
            || (index_len == 0) != (zstd_index_len == 0)
            || (scales_len + values_len == 0) != (payload_len == zstd_index_len))
    {
        return Err(Error::Inconsistent(
            "compressed part lengths do not fit the sections",
        ));
    }
    let frame_len = header_len
        .checked_add(payload_len)
        .ok_or(Error::Inconsistent("payload length overflows"))?;
    if frame.len() < frame_len {
        return Err(Error::Truncated {
            needed: frame_len,
            have: frame.len(),
        });
    }
    if frame.len() > frame_len {
        return Err(Error::Inconsistent("bytes after the end of the frame"));
    }
    Ok(FrameInfo {
        codec,
        seed,
        elements,
        kept,
        index,
        frame_len,
        shape,
        ndim,
        header_len,
        index_len,
        scales_len,
        values_len,
        zstd_index_len,
        checksum: u32_at(frame, CHECKSUM_AT),
    })
}

/// The checksum of a whole frame, skipping its own field.
pub(crate) fn checksum(frame: &[u8], header_len: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&frame[..CHECKSUM_AT]);
    h.update(&frame[CHECKSUM_AT + 4..header_len]);
    h.update(&frame[header_len..]);
    h.finalize()
}

/// The fields the encoder writes.
pub(crate) struct HeaderFields<'a> {
    pub codec: &'a Codec,
    pub seed: u64,
    pub shape: &'a [usize],
    pub elements: usize,
    pub kept: usize,
    pub index: IndexCoding,
    pub index_len: usize,
    pub scales_len: usize,
    pub values_len: usize,
}

/// Clears `out` and writes the header with zero payload length and checksum; returns its length.
pub(crate) fn write_header(out: &mut Vec<u8>, h: &HeaderFields<'_>) -> usize {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(h.shape.len() as u8);
    out.push(match h.codec.topk {
        None if h.codec.dedup => 3,
        None => 0,
        Some(TopK { per_row: false, .. }) => 1,
        Some(TopK { per_row: true, .. }) => 2,
    });
    let (coding, block) = match h.codec.values {
        Values::F32 => (0u8, 0u32),
        Values::F16 => (1, 0),
        Values::Bf16 => (2, 0),
        Values::Quant { bits, block } => (
            3 + CODING_BITS
                .iter()
                .position(|&b| b == bits)
                .expect("a validated codec has 2..=8 bits") as u8,
            block,
        ),
    };
    out.push(coding);
    let index_bits = match h.index {
        IndexCoding::Dense => 0u8,
        IndexCoding::Bitmap => 1,
        IndexCoding::DeltaVarint => 2,
        IndexCoding::RowMap => 3,
    };
    out.push(h.codec.rotate as u8 | ((h.codec.zstd.is_some() as u8) << 1) | (index_bits << 2));
    out.push(h.codec.zstd.unwrap_or(0) as i8 as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&block.to_le_bytes());
    let fraction = h.codec.topk.map(|t| t.fraction.to_bits()).unwrap_or(0);
    out.extend_from_slice(&fraction.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let seed = if h.codec.rotate { h.seed } else { 0 };
    for v in [
        seed,
        h.elements as u64,
        h.kept as u64,
        h.index_len as u64,
        h.scales_len as u64,
        h.values_len as u64,
        0,
        0,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for &d in h.shape {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    out.len()
}

/// Fills in payload length, compressed index length and checksum once the payload follows the
/// header in `out`.
pub(crate) fn seal(out: &mut [u8], header_len: usize, zstd_index_len: usize) {
    let payload = (out.len() - header_len) as u64;
    out[72..80].copy_from_slice(&payload.to_le_bytes());
    out[80..88].copy_from_slice(&(zstd_index_len as u64).to_le_bytes());
    let sum = checksum(out, header_len);
    out[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&sum.to_le_bytes());
}
