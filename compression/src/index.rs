//! Positions of kept values: a bitmap (1 bit per element) or LEB128 gaps (about 1 byte per kept
//! value at 10% density), whichever is smaller for the frame at hand.

use crate::error::{Error, Result};
use crate::frame::MAX_VARINT;

#[inline(always)]
fn varint_len(v: u32) -> usize {
    // 7 payload bits per byte.
    let bits = 32 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Bytes of the delta-varint coding of increasing `positions`.
pub(crate) fn varint_size(positions: &[u32]) -> usize {
    let mut prev = u32::MAX; // so that the first gap is `pos - prev - 1 = pos`
    let mut total = 0;
    for &p in positions {
        total += varint_len(p.wrapping_sub(prev).wrapping_sub(1));
        prev = p;
    }
    total
}

/// Bitmap bytes for `n` elements.
pub(crate) fn bitmap_size(n: usize) -> usize {
    n.div_ceil(8)
}

/// Writes the bitmap of increasing `positions` into `dst` (which must be zeroed and
/// `bitmap_size(n)` long). Each 64-bit word is assembled in a register and stored once: setting
/// bits in memory made every position a read-modify-write of the byte the previous one wrote.
pub(crate) fn write_bitmap(positions: &[u32], dst: &mut [u8]) {
    let store = |dst: &mut [u8], w: usize, word: u64| {
        let end = (8 * w + 8).min(dst.len());
        let bytes = &mut dst[8 * w..end];
        let n = bytes.len();
        bytes.copy_from_slice(&word.to_le_bytes()[..n]);
    };
    let (mut at, mut word) = (0usize, 0u64);
    for &p in positions {
        let w = (p >> 6) as usize;
        if w != at {
            if word != 0 {
                store(dst, at, word);
            }
            (at, word) = (w, 0);
        }
        word |= 1 << (p & 63);
    }
    if word != 0 {
        store(dst, at, word);
    }
}

/// Writes the gaps of increasing `positions` into `dst` (exactly `varint_size` long).
pub(crate) fn write_varint(positions: &[u32], dst: &mut [u8]) {
    let mut prev = u32::MAX;
    let mut at = 0;
    for &p in positions {
        let mut gap = p.wrapping_sub(prev).wrapping_sub(1);
        prev = p;
        while gap >= 0x80 {
            dst[at] = (gap as u8) | 0x80;
            gap >>= 7;
            at += 1;
        }
        dst[at] = gap as u8;
        at += 1;
    }
}

/// Reads a bitmap of `n` elements holding exactly `kept` set bits into `out`.
pub(crate) fn read_bitmap(src: &[u8], n: usize, kept: usize, out: &mut Vec<u32>) -> Result<()> {
    debug_assert_eq!(src.len(), bitmap_size(n));
    let ones: usize = src.iter().map(|b| b.count_ones() as usize).sum();
    if ones != kept {
        return Err(Error::Corrupt(
            "bitmap population differs from the kept count",
        ));
    }
    if !n.is_multiple_of(8) && src.last().copied().unwrap_or(0) >> (n % 8) != 0 {
        return Err(Error::Corrupt("bitmap bits set past the last element"));
    }
    // Eight positions per byte from a table, written whole and kept as far as the byte's
    // population: a vector add per byte instead of a loop per set bit. The population check
    // above bounds the cursor by `kept`, so eight slots of slack take the last byte's writes.
    out.clear();
    out.resize(kept + 8, 0);
    let mut c = 0usize;
    for (i, &b) in src.iter().enumerate() {
        let base = 8 * i as u32;
        let dst: &mut [u32; 8] = (&mut out[c..c + 8]).try_into().expect("8 slots");
        for (d, &j) in dst.iter_mut().zip(&BYTE_POSITIONS[b as usize]) {
            *d = base + j as u32;
        }
        c += b.count_ones() as usize;
    }
    out.truncate(kept);
    Ok(())
}

/// The positions of the set bits of each byte, in increasing order (the rest zero).
const BYTE_POSITIONS: [[u8; 8]; 256] = {
    let mut t = [[0u8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let (mut j, mut c) = (0, 0);
        while j < 8 {
            if (b >> j) & 1 == 1 {
                t[b][c] = j as u8;
                c += 1;
            }
            j += 1;
        }
        b += 1;
    }
    t
};

/// Reads exactly `kept` gaps from `src` (consuming all of it) into increasing positions `< n`.
pub(crate) fn read_varint(src: &[u8], n: usize, kept: usize, out: &mut Vec<u32>) -> Result<()> {
    out.clear();
    out.reserve(kept);
    let mut at = 0usize;
    let mut next: u64 = 0; // smallest position the next entry may take
    for _ in 0..kept {
        let mut gap: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&b) = src.get(at) else {
                return Err(Error::Corrupt("delta varints end early"));
            };
            at += 1;
            if shift >= 7 * MAX_VARINT as u32 - 7 && b > 1 {
                return Err(Error::Corrupt("delta varint overflows"));
            }
            gap |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let pos = next
            .checked_add(gap)
            .ok_or(Error::Corrupt("delta varint overflows"))?;
        if pos >= n as u64 {
            return Err(Error::Corrupt("delta varint points past the last element"));
        }
        out.push(pos as u32);
        next = pos + 1;
    }
    if at != src.len() {
        return Err(Error::Corrupt("bytes left after the delta varints"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codings_round_trip() {
        let n = 100_003usize;
        let positions: Vec<u32> = (0..n as u32)
            .filter(|i| i % 7 == 0 || i % 1009 == 3 || *i == n as u32 - 1)
            .collect();
        let mut bm = vec![0u8; bitmap_size(n)];
        write_bitmap(&positions, &mut bm);
        let mut back = Vec::new();
        read_bitmap(&bm, n, positions.len(), &mut back).unwrap();
        assert_eq!(back, positions);

        let mut vi = vec![0u8; varint_size(&positions)];
        write_varint(&positions, &mut vi);
        read_varint(&vi, n, positions.len(), &mut back).unwrap();
        assert_eq!(back, positions);
    }

    #[test]
    fn varint_sizes() {
        assert_eq!(varint_size(&[0, 1, 2]), 3);
        assert_eq!(varint_size(&[127]), 1);
        assert_eq!(varint_size(&[128]), 2);
        assert_eq!(varint_size(&[0, 129]), 3); // gaps 0 and 128
        assert_eq!(varint_size(&[u32::MAX - 1]), 5);
    }

    #[test]
    fn malformed_indices_are_rejected() {
        let mut out = Vec::new();
        // Wrong population, bits past the end.
        assert!(read_bitmap(&[0b1], 8, 2, &mut out).is_err());
        assert!(read_bitmap(&[0b1000_0000], 7, 1, &mut out).is_err());
        // Truncated, past the end, trailing bytes, overlong.
        assert!(read_varint(&[0x80], 10, 1, &mut out).is_err());
        assert!(read_varint(&[10], 10, 1, &mut out).is_err());
        assert!(read_varint(&[1, 1], 10, 1, &mut out).is_err());
        assert!(read_varint(&[0xff; 11], u32::MAX as usize, 1, &mut out).is_err());
        assert!(
            read_varint(
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                usize::MAX,
                1,
                &mut out
            )
            .is_err()
        );
    }
}
