//! Codec names: what a pipeline does, as a value and as a string (`topk:0.1+q8+zstd:3`).
//!
//! A [`Codec`] is plain data (no scratch, no state); [`crate::Encoder`] runs it. The string form is
//! what run configs and the command line use: `FromStr` and `Display` round-trip, and serde reads
//! and writes the string.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The grammar of codec names, shown in every parse error.
pub const GRAMMAR: &str = "Valid: `none`, or stages joined by `+` in this order: \
[topk:F | topk-row:F | dedup] (keep the fraction F in (0,1] of largest magnitudes, per tensor or \
per row; or send each distinct row (last dimension) once plus a row map, exact) \
[rht] (randomized Hadamard rotation, only before q8/q4/q2) \
[fp32 | fp16 | bf16 | qN[:B]] (value coding; qN = blockwise absmax N-bit, N in 2..=8: q2 and q4 \
bit-packed, q3 and q5-q8 one code per byte for zstd to entropy-code; B = block size 1..=65536, \
default 64, a power of two with rht) \
[zstd[:L]] (zstd level -7..=22 except 0, default 3). \
Examples: none, bf16, q8, q8:4096, rht+q4, topk:0.1+q8+zstd:3";

/// Default quantizer block size: small blocks keep heavy-tailed activations accurate, and at 64 the
/// fp32 scale costs half a bit per value.
pub const DEFAULT_BLOCK: u32 = 64;
/// Largest quantizer block size.
pub const MAX_BLOCK: u32 = 1 << 16;
/// Default zstd level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Bits a quantized code takes in a frame: 2 and 4 are packed, the rest take a byte.
pub(crate) fn stored_bits(bits: u8) -> u8 {
    match bits {
        2 | 4 => bits,
        _ => 8,
    }
}

/// Which elements a codec keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopK {
    /// Fraction of elements kept, in (0, 1]: `k = round(fraction * n)`, at least 1 when `n > 0`.
    pub fraction: f32,
    /// Select per row (the last dimension of the shape) instead of over the whole tensor.
    pub per_row: bool,
}

impl TopK {
    /// How many of `n` elements are kept.
    pub fn k_of(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        // Rounding (not ceiling) so that 0.1f32, a hair above 0.1, keeps exactly 10% of 10^6.
        let k = (self.fraction as f64 * n as f64).round() as usize;
        k.clamp(1, n)
    }
}

/// How the kept values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Raw little-endian fp32: exact.
    F32,
    /// IEEE half precision (round to nearest even).
    F16,
    /// bfloat16 (round to nearest even): fp32's range with 8 bits of mantissa.
    Bf16,
    /// Blockwise absmax quantization: `bits` in 2..=8, one fp32 scale per `block` values.
    ///
    /// Levels are the integers `-q..=q` with `q = 2^(bits-1) - 1` times the scale (2-bit: the four
    /// levels ±1/3, ±1 of the absmax). 2- and 4-bit codes are bit-packed; the others take a byte
    /// each, so that zstd's entropy coder, not the packing, sets their size: the wire cost is then
    /// close to the codes' entropy, which is what makes 5- and 6-bit codes cheap after a rotation.
    Quant {
        /// Bits per value: 2..=8.
        bits: u8,
        /// Values per scale.
        block: u32,
    },
}

impl Values {
    /// Bits per value before zstd (the frame's storage), for size estimates.
    pub fn bits(&self) -> u32 {
        match self {
            Values::F32 => 32,
            Values::F16 | Values::Bf16 => 16,
            Values::Quant { bits, .. } => stored_bits(*bits) as u32,
        }
    }
}

/// A compression pipeline: top-k or row dedup, then optional rotation, then value coding, then
/// optional zstd.
///
/// Build one by parsing a name (`"topk:0.1+q8+zstd:3".parse::<Codec>()`) or with the fields and
/// [`Codec::validate`]. [`Codec::NONE`] is exact fp32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Codec {
    /// Sparsification, if any.
    pub topk: Option<TopK>,
    /// Send each distinct row (last dimension, compared bit for bit) once, plus a map from rows to
    /// distinct rows: exact, and large where rows repeat, as embedding outputs do (one row per
    /// token id). Exclusive with top-k.
    pub dedup: bool,
    /// Randomized Hadamard rotation of each full block before quantization (spreads outliers).
    pub rotate: bool,
    /// Value coding.
    pub values: Values,
    /// zstd level applied to the whole payload, if any.
    pub zstd: Option<i32>,
}

impl Default for Codec {
    fn default() -> Self {
        Codec::NONE
    }
}

impl Codec {
    /// Exact fp32, no compression.
    pub const NONE: Codec = Codec {
        topk: None,
        dedup: false,
        rotate: false,
        values: Values::F32,
        zstd: None,
    };

    /// Checks the invariants a parsed name guarantees (used for codecs built from fields and for
    /// codecs read from frames).
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidCodec {
                name: format!("{self:?}"),
                reason,
            })
        };
        if let Some(t) = self.topk
            && !(t.fraction > 0.0 && t.fraction <= 1.0)
        {
            return bad(format!("top-k fraction {} is not in (0, 1]", t.fraction));
        }
        if self.dedup && self.topk.is_some() {
            return bad("dedup and top-k cannot be combined".into());
        }
        match self.values {
            Values::Quant { bits, block } => {
                if !(2..=8).contains(&bits) {
                    return bad(format!("{bits}-bit quantization does not exist"));
                }
                if block == 0 || block > MAX_BLOCK {
                    return bad(format!("block size {block} is not in 1..={MAX_BLOCK}"));
                }
                if self.rotate && !block.is_power_of_two() {
                    return bad(format!("rht needs a power-of-two block, not {block}"));
                }
            }
            _ if self.rotate => return bad("rht must be followed by a quantizer (qN)".into()),
            _ => {}
        }
        if let Some(l) = self.zstd
            && !(-7..=22).contains(&l)
        {
            return bad(format!("zstd level {l} is not in -7..=22"));
        }
        if self.zstd == Some(0) {
            return bad("zstd level 0 is not allowed (write `zstd` for the default)".into());
        }
        Ok(())
    }

    /// Expected bits per element of a dense fp32 tensor before zstd, ignoring the header: a rough
    /// figure for planning.
    pub fn nominal_bits_per_element(&self) -> f64 {
        let mut bits = self.values.bits() as f64;
        if let Values::Quant { block, .. } = self.values {
            bits += 32.0 / block as f64;
        }
        match self.topk {
            Some(t) => {
                let f = t.fraction as f64;
                f * bits + (8.0 * f).min(1.0)
            }
            None => bits,
        }
    }
}

fn parse_stage_arg<T: FromStr>(name: &str, stage: &str, arg: &str) -> Result<T> {
    arg.parse::<T>().map_err(|_| Error::InvalidCodec {
        name: name.into(),
        reason: format!("`{arg}` is not a valid argument of `{stage}`"),
    })
}

impl FromStr for Codec {
    type Err = Error;

    fn from_str(name: &str) -> Result<Codec> {
        let err = |reason: String| Error::InvalidCodec {
            name: name.into(),
            reason,
        };
        let trimmed = name.trim();
        if trimmed.is_empty() {
            return Err(err("empty name".into()));
        }
        if trimmed.eq_ignore_ascii_case("none") {
            return Ok(Codec::NONE);
        }
        let mut codec = Codec::NONE;
        // Stages must come in pipeline order; `rank` is the last stage's position.
        let mut rank = 0u8;
        let mut have_values = false;
        for stage in trimmed.split('+') {
            let stage = stage.trim().to_ascii_lowercase();
            let (head, arg) = match stage.split_once(':') {
                Some((h, a)) => (h, Some(a)),
                None => (stage.as_str(), None),
            };
            let this_rank = match head {
                "topk" | "topk-row" | "dedup" => 1,
                "rht" => 2,
                "fp32" | "f32" | "fp16" | "f16" | "bf16" => 3,
                "q2" | "q3" | "q4" | "q5" | "q6" | "q7" | "q8" => 3,
                "zstd" => 4,
                "none" => return Err(err("`none` cannot be combined with other stages".into())),
                _ => return Err(err(format!("unknown stage `{stage}`"))),
            };
            if this_rank == 1 && rank == 1 {
                return Err(err("dedup and top-k cannot be combined".into()));
            }
            if this_rank <= rank {
                return Err(err(format!("stage `{stage}` is repeated or out of order")));
            }
            rank = this_rank;
            match head {
                "topk" | "topk-row" => {
                    let a = arg.ok_or_else(|| {
                        err(format!("`{head}` needs a fraction, e.g. `{head}:0.1`"))
                    })?;
                    let fraction: f32 = parse_stage_arg(name, head, a)?;
                    if !(fraction > 0.0 && fraction <= 1.0) {
                        return Err(err(format!("top-k fraction {a} is not in (0, 1]")));
                    }
                    codec.topk = Some(TopK {
                        fraction,
                        per_row: head == "topk-row",
                    });
                }
                "dedup" => {
                    if arg.is_some() {
                        return Err(err("`dedup` takes no argument".into()));
                    }
                    codec.dedup = true;
                }
                "rht" => {
                    if arg.is_some() {
                        return Err(err(
                            "`rht` takes no argument (its seed travels in the frame)".into(),
                        ));
                    }
                    codec.rotate = true;
                }
                "fp32" | "f32" | "fp16" | "f16" | "bf16" => {
                    if arg.is_some() {
                        return Err(err(format!("`{head}` takes no argument")));
                    }
                    have_values = true;
                    codec.values = match head {
                        "fp32" | "f32" => Values::F32,
                        "fp16" | "f16" => Values::F16,
                        _ => Values::Bf16,
                    };
                }
                "q2" | "q3" | "q4" | "q5" | "q6" | "q7" | "q8" => {
                    let block = match arg {
                        Some(a) => parse_stage_arg::<u32>(name, head, a)?,
                        None => DEFAULT_BLOCK,
                    };
                    have_values = true;
                    codec.values = Values::Quant {
                        bits: head[1..].parse().expect("q2..q8"),
                        block,
                    };
                }
                "zstd" => {
                    let level = match arg {
                        Some(a) => parse_stage_arg::<i32>(name, head, a)?,
                        None => DEFAULT_ZSTD_LEVEL,
                    };
                    codec.zstd = Some(level);
                }
                _ => unreachable!("heads are matched above"),
            }
        }
        if codec.rotate && !matches!(codec.values, Values::Quant { .. }) {
            return Err(err(if have_values {
                "rht must be followed by a quantizer (qN)".into()
            } else {
                "rht needs a quantizer after it (qN, e.g. q4)".into()
            }));
        }
        codec.validate().map_err(|e| match e {
            Error::InvalidCodec { reason, .. } => err(reason),
            other => other,
        })?;
        Ok(codec)
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(t) = self.topk {
            let head = if t.per_row { "topk-row" } else { "topk" };
            parts.push(format!("{head}:{}", t.fraction));
        }
        if self.dedup {
            parts.push("dedup".into());
        }
        if self.rotate {
            parts.push("rht".into());
        }
        match self.values {
            Values::F32 => {}
            Values::F16 => parts.push("fp16".into()),
            Values::Bf16 => parts.push("bf16".into()),
            Values::Quant { bits, block } if block == DEFAULT_BLOCK => {
                parts.push(format!("q{bits}"))
            }
            Values::Quant { bits, block } => parts.push(format!("q{bits}:{block}")),
        }
        if let Some(l) = self.zstd {
            parts.push(format!("zstd:{l}"));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join("+"))
        }
    }
}

impl serde::Serialize for Codec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Codec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "none",
            "fp16",
            "bf16",
            "q8",
            "q4",
            "q2",
            "q3",
            "q5:1024",
            "rht+q6:256+zstd:3",
            "dedup+rht+q6:256+zstd:3",
            "dedup",
            "q7",
            "q8:4096",
            "rht+q4",
            "rht+q2:256",
            "topk:0.1+q8+zstd:3",
            "topk-row:0.25+bf16",
            "topk:0.01",
            "zstd:1",
            "q8+zstd:-3",
        ] {
            let c: Codec = name.parse().unwrap();
            assert_eq!(c.to_string(), name);
            assert_eq!(c.to_string().parse::<Codec>().unwrap(), c);
        }
    }

    #[test]
    fn aliases_and_defaults() {
        let c: Codec = "topk:0.1+q8+zstd".parse().unwrap();
        assert_eq!(c.to_string(), "topk:0.1+q8+zstd:3");
        assert_eq!(c.values, Values::Quant { bits: 8, block: 64 });
        assert_eq!("f16".parse::<Codec>().unwrap().to_string(), "fp16");
        assert_eq!("fp32".parse::<Codec>().unwrap(), Codec::NONE);
        assert_eq!(" Q8 ".parse::<Codec>().unwrap().to_string(), "q8");
    }

    #[test]
    fn bad_names_are_explained() {
        for (name, needle) in [
            ("", "empty"),
            ("q1", "unknown stage"),
            ("dedup+topk:0.1", "cannot be combined"),
            ("topk:0.1+dedup", "cannot be combined"),
            ("dedup:2", "takes no argument"),
            ("q9", "unknown stage"),
            ("q8+topk:0.1", "out of order"),
            ("q8+q4", "out of order"),
            ("topk", "needs a fraction"),
            ("topk:1.5", "not in (0, 1]"),
            ("topk:0", "not in (0, 1]"),
            ("topk:nan", "not in (0, 1]"),
            ("topk:x", "not a valid argument"),
            ("rht", "needs a quantizer"),
            ("rht+bf16", "must be followed"),
            ("rht+q8:100", "power-of-two"),
            ("q8:0", "block size"),
            ("zstd:99", "zstd level"),
            ("zstd:0", "level 0"),
            ("none+q8", "cannot be combined"),
        ] {
            let e = name.parse::<Codec>().unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(needle), "{name}: {msg}");
            assert!(
                msg.contains("Valid:"),
                "{name}: the error lists what is valid: {msg}"
            );
        }
    }

    #[test]
    fn serde_uses_the_string() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Run {
            codec: Codec,
        }
        let json = serde_json::to_string(&Run {
            codec: "topk:0.1+q8+zstd:3".parse().unwrap(),
        })
        .unwrap();
        assert_eq!(json, r#"{"codec":"topk:0.1+q8+zstd:3"}"#);
        let back: Run = serde_json::from_str(&json).unwrap();
        assert_eq!(back.codec.to_string(), "topk:0.1+q8+zstd:3");
        assert!(serde_json::from_str::<Run>(r#"{"codec":"q9"}"#).is_err());
    }

    #[test]
    fn k_is_rounded_and_at_least_one() {
        let t = TopK {
            fraction: 0.1,
            per_row: false,
        };
        assert_eq!(t.k_of(0), 0);
        assert_eq!(t.k_of(1), 1);
        assert_eq!(t.k_of(10), 1);
        assert_eq!(t.k_of(11), 1);
        assert_eq!(t.k_of(15), 2);
        assert_eq!(t.k_of(1_000_000), 100_000);
    }
}
