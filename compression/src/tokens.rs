//! Token ids on the wire: the second half of a subspace network's stage boundary (issue #13),
//! which sends `k` coordinates per token plus the token ids (the receiver rebuilds the hidden
//! state from the fixed token table).
//!
//! Layout (little-endian): magic `SWTK`, version `1`, width `w` (1, 2, 3 or 4 bytes per id, the
//! fewest that hold the largest id), count `n` (u32), payload length `z` (u32), then `z` bytes of
//! one zstd frame holding exactly `n·w` bytes. A section is canonical: the same ids give the same
//! bytes. Decoding checks the header against the caller's cap before anything is sized, and
//! decompresses into at most `n·w` bytes.

use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"SWTK";
const VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 1 + 4 + 4;
const LEVEL: i32 = 3;

fn width_for(max: u32) -> u8 {
    match max {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xff_ffff => 3,
        _ => 4,
    }
}

/// Appends the token section of `ids` to `out`.
pub fn encode_tokens(ids: &[u32], out: &mut Vec<u8>) -> Result<()> {
    let n = u32::try_from(ids.len()).map_err(|_| Error::Inconsistent("too many token ids"))?;
    let w = width_for(ids.iter().copied().max().unwrap_or(0));
    let mut raw = Vec::with_capacity(ids.len() * w as usize);
    for &id in ids {
        raw.extend_from_slice(&id.to_le_bytes()[..w as usize]);
    }
    let z = zstd::bulk::compress(&raw, LEVEL).map_err(|e| Error::Zstd(e.to_string()))?;
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(w);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&(z.len() as u32).to_le_bytes());
    out.extend_from_slice(&z);
    Ok(())
}

/// Reads a token section at the start of `bytes`: at most `max_count` ids, each below `vocab`.
/// Returns the ids and the bytes the section took (what follows is the caller's).
pub fn decode_tokens(bytes: &[u8], max_count: usize, vocab: u32) -> Result<(Vec<u32>, usize)> {
    if bytes.len() < HEADER {
        return Err(Error::Truncated {
            needed: HEADER,
            have: bytes.len(),
        });
    }
    if &bytes[..4] != MAGIC {
        return Err(Error::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(Error::UnsupportedVersion(bytes[4]));
    }
    let w = bytes[5] as usize;
    if !(1..=4).contains(&w) {
        return Err(Error::Inconsistent("token width not in 1..=4"));
    }
    let n = u32::from_le_bytes(bytes[6..10].try_into().expect("4 bytes")) as usize;
    let z = u32::from_le_bytes(bytes[10..14].try_into().expect("4 bytes")) as usize;
    if n > max_count {
        return Err(Error::TooLarge {
            declared: n as u64,
            limit: max_count,
        });
    }
    let end = HEADER
        .checked_add(z)
        .filter(|&e| e <= bytes.len())
        .ok_or(Error::Truncated {
            needed: HEADER.saturating_add(z),
            have: bytes.len(),
        })?;
    // n <= max_count, so this capacity is the caller's bound.
    let raw = zstd::bulk::decompress(&bytes[HEADER..end], n * w)
        .map_err(|_| Error::Corrupt("token ids: bad zstd stream"))?;
    if raw.len() != n * w {
        return Err(Error::Corrupt(
            "token ids: payload length differs from the count",
        ));
    }
    let mut ids = Vec::with_capacity(n);
    for c in raw.chunks_exact(w) {
        let mut b = [0u8; 4];
        b[..w].copy_from_slice(c);
        let id = u32::from_le_bytes(b);
        if id >= vocab {
            return Err(Error::Inconsistent("token id beyond the vocabulary"));
        }
        ids.push(id);
    }
    if w as u8 != width_for(ids.iter().copied().max().unwrap_or(0)) {
        return Err(Error::Inconsistent(
            "token width is not the smallest that holds the ids",
        ));
    }
    Ok((ids, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_canonical() {
        for ids in [
            vec![],
            vec![0u32, 5, 255, 3],
            vec![256, 70_000, 1],
            vec![u32::MAX - 1; 9],
        ] {
            let mut out = vec![7u8]; // appends after what is there
            encode_tokens(&ids, &mut out).unwrap();
            let (back, used) = decode_tokens(&out[1..], ids.len(), u32::MAX).unwrap();
            assert_eq!(back, ids);
            assert_eq!(used, out.len() - 1);
            let mut again = vec![7u8];
            encode_tokens(&ids, &mut again).unwrap();
            assert_eq!(again, out);
        }
    }

    #[test]
    fn rejects_malformed_sections_without_panicking() {
        let ids: Vec<u32> = (0..300).map(|i| i % 200).collect();
        let mut good = Vec::new();
        encode_tokens(&ids, &mut good).unwrap();
        assert!(matches!(
            decode_tokens(&good, 299, 256),
            Err(Error::TooLarge { .. })
        ));
        assert!(
            decode_tokens(&good, 300, 100).is_err(),
            "id beyond the vocabulary"
        );
        for cut in 0..good.len() {
            assert!(
                decode_tokens(&good[..cut], 300, 256).is_err(),
                "cut at {cut}"
            );
        }
        for i in 0..good.len() {
            for bit in [1u8, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                // Either refused or, where zstd's content is unchecked, ids of the right count
                // within the vocabulary.
                if let Ok((back, _)) = decode_tokens(&bad, 300, 256) {
                    assert!(back.len() <= 300 && back.iter().all(|&t| t < 256));
                }
            }
        }
        // A count that would need a huge buffer is refused before any allocation.
        let mut forged = good.clone();
        forged[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_tokens(&forged, 1 << 20, 256),
            Err(Error::TooLarge { .. })
        ));
    }
}
