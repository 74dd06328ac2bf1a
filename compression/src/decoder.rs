//! [`Decoder`]: validates a frame from an untrusted peer and writes its tensor into a caller's buffer.

use crate::codec::{Codec, Values};
use crate::error::{Error, Result};
use crate::frame::{self, FrameInfo, IndexCoding, Limits};
use crate::{index, quant, rotate};

/// Decodes frames of any codec, keeping scratch space between calls.
///
/// The header is validated completely (against the caller's [`Limits`]) and the checksum verified
/// before any buffer is sized from it; after warm-up decoding allocates nothing. One decoder per
/// thread; it is `Send`.
#[derive(Default)]
pub struct Decoder {
    raw: Vec<u8>,
    scratch: Scratch,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder with empty scratch.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Decodes `frame` into `out`, which is resized to the frame's element count (its capacity is
    /// reused). Returns the validated header.
    pub fn decode(
        &mut self,
        frame: &[u8],
        limits: &Limits,
        out: &mut Vec<f32>,
    ) -> Result<FrameInfo> {
        let info = self.check(frame, limits)?;
        // A reused buffer is not cleared first: every path below writes all of it (a sparse
        // frame zero-fills what it does not keep), so a 4 MB memset per frame is saved.
        out.truncate(info.elements);
        out.resize(info.elements, 0.0);
        self.decode_checked(frame, &info, out, false)?;
        Ok(info)
    }

    /// Decodes `frame` into `out`, whose length must equal the frame's element count (e.g. a
    /// gradient buffer of known shape). `out` is unspecified after an error.
    pub fn decode_into(
        &mut self,
        frame: &[u8],
        limits: &Limits,
        out: &mut [f32],
    ) -> Result<FrameInfo> {
        let info = self.check(frame, limits)?;
        if out.len() != info.elements {
            return Err(Error::OutputLength {
                needed: info.elements,
                have: out.len(),
            });
        }
        self.decode_checked(frame, &info, out, false)?;
        Ok(info)
    }

    /// Header validation and checksum.
    fn check(&mut self, frame: &[u8], limits: &Limits) -> Result<FrameInfo> {
        let info = FrameInfo::read(frame, limits)?;
        let actual = frame::checksum(frame, info.header_len);
        if actual != info.checksum {
            return Err(Error::Checksum {
                expected: info.checksum,
                actual,
            });
        }
        Ok(info)
    }

    /// `zeroed`: `out` is known to be all zeros already (skips a fill for sparse frames).
    fn decode_checked(
        &mut self,
        frame: &[u8],
        info: &FrameInfo,
        out: &mut [f32],
        zeroed: bool,
    ) -> Result<()> {
        let payload = &frame[info.header_len..];
        let raw_len = info.raw_payload_len();
        let raw: &[u8] = if info.codec.zstd.is_some() {
            if self.zstd.is_none() {
                self.zstd = Some(
                    zstd::bulk::Decompressor::new()
                        .map_err(|_| Error::Corrupt("zstd context could not be created"))?,
                );
            }
            let z = self.zstd.as_mut().expect("set above");
            // Sized from validated lengths (a few bytes per element under the caller's cap).
            // Not cleared first: zstd fills all of it (the lengths are checked below).
            self.raw.truncate(raw_len);
            self.raw.resize(raw_len, 0);
            let (zidx, zrest) = payload.split_at(info.zstd_index_len);
            let (idx, rest) = self.raw.split_at_mut(info.index_len);
            for (src, dst) in [(zidx, idx), (zrest, rest)] {
                if dst.is_empty() {
                    continue; // and `src` is empty too, as the header check ensured
                }
                let n = z.decompress_to_buffer(src, dst).map_err(|_| {
                    Error::Corrupt("zstd stream does not decode to the declared size")
                })?;
                if n != dst.len() {
                    return Err(Error::Corrupt(
                        "zstd stream is shorter than the declared sections",
                    ));
                }
            }
            &self.raw
        } else {
            payload
        };
        let (idx, rest) = raw.split_at(info.index_len);
        let (scales, values) = rest.split_at(info.scales_len);
        let sections = Sections {
            codec: &info.codec,
            seed: info.seed,
            shape: info.shape(),
            kept: info.kept,
            index: info.index,
            idx,
            scales,
            values,
        };
        sections.decode(&mut self.scratch, out, zeroed)
    }
}

/// A frame's sections after zstd, with what the header says about them: what [`Decoder`] decodes
/// a frame from, and what [`crate::Encoder::encode_decoded`] decodes its own frame from before
/// zstd (the same code on the same bytes, so the same bits).
pub(crate) struct Sections<'a> {
    pub codec: &'a Codec,
    pub seed: u64,
    pub shape: &'a [usize],
    pub kept: usize,
    pub index: IndexCoding,
    pub idx: &'a [u8],
    pub scales: &'a [u8],
    pub values: &'a [u8],
}

/// Positions and kept values of a sparse frame while it is decoded (capacities reused).
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    positions: Vec<u32>,
    vals: Vec<f32>,
}

impl Sections<'_> {
    /// Writes the tensor into `out` (its element count long). `zeroed`: `out` is known to be all
    /// zeros already (skips a fill for sparse frames).
    pub(crate) fn decode(
        &self,
        scratch: &mut Scratch,
        out: &mut [f32],
        zeroed: bool,
    ) -> Result<()> {
        let Scratch { positions, vals } = scratch;
        let (idx, scales, values) = (self.idx, self.scales, self.values);
        let coding = self.codec.values;
        let block = match coding {
            Values::Quant { block, .. } => block as usize,
            _ => 0,
        };
        let rotate = self.codec.rotate;
        match self.index {
            IndexCoding::Dense => {
                quant::decode(coding, scales, values, out)?;
                if rotate {
                    rotate::inverse(out, block, self.seed);
                }
            }
            IndexCoding::RowMap => {
                let w = self.shape.last().copied().unwrap_or(1);
                let distinct = self.kept / w;
                read_row_map(idx, distinct, positions)?;
                vals.clear();
                vals.resize(self.kept, 0.0);
                quant::decode(coding, scales, values, vals)?;
                if rotate {
                    rotate::inverse(vals, block, self.seed);
                }
                for (dst, &d) in out.chunks_exact_mut(w).zip(positions.iter()) {
                    let d = d as usize;
                    dst.copy_from_slice(&vals[d * w..(d + 1) * w]);
                }
            }
            sparse => {
                if sparse == IndexCoding::Bitmap {
                    index::read_bitmap(idx, out.len(), self.kept, positions)?;
                } else {
                    index::read_varint(idx, out.len(), self.kept, positions)?;
                }
                vals.clear();
                vals.resize(self.kept, 0.0);
                quant::decode(coding, scales, values, vals)?;
                if rotate {
                    rotate::inverse(vals, block, self.seed);
                }
                if !zeroed {
                    out.fill(0.0);
                }
                for (&p, &v) in positions.iter().zip(vals.iter()) {
                    // Positions were checked to be increasing and below the element count.
                    out[p as usize] = v;
                }
            }
        }
        Ok(())
    }
}

/// Reads a row map (length checked against the row count by the header) into `rows`, checking
/// that distinct rows are numbered in order of first appearance and that all `distinct` appear:
/// one canonical frame per tensor.
fn read_row_map(idx: &[u8], distinct: usize, rows: &mut Vec<u32>) -> Result<()> {
    let w = frame::row_map_width(distinct);
    rows.clear();
    let mut next = 0usize;
    for e in idx.chunks_exact(w) {
        let mut b = [0u8; 4];
        b[..w].copy_from_slice(e);
        let r = u32::from_le_bytes(b) as usize;
        if r > next || r >= distinct {
            return Err(Error::Corrupt(
                "row map is not in order of first appearance",
            ));
        }
        if r == next {
            next += 1;
        }
        rows.push(r as u32);
    }
    if next != distinct {
        return Err(Error::Corrupt("row map leaves a distinct row unused"));
    }
    Ok(())
}

/// Decodes one frame with a fresh decoder: convenient, but allocates; streams keep a [`Decoder`].
pub fn decode_frame(frame: &[u8], limits: &Limits) -> Result<(FrameInfo, Vec<f32>)> {
    let mut out = Vec::new();
    let info = Decoder::new().decode(frame, limits, &mut out)?;
    Ok((info, out))
}
