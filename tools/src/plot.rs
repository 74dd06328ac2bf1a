//! Line charts as SVG and PNG without system fonts or a plotting crate: the chart is laid out
//! once as a list of primitives (lines, text), written as SVG text, or rasterized into an RGB
//! buffer with a 5x7 bitmap font and encoded with the `png` crate. Used by `swarm replay`.

use std::fmt::Write as _;

/// One curve.
#[derive(Clone, Debug)]
pub(crate) struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Dashed (the local baseline).
    pub dashed: bool,
}

/// A vertical marker (an event) at `x`.
#[derive(Clone, Debug)]
pub(crate) struct Marker {
    pub x: f64,
    pub label: String,
}

/// A line chart.
#[derive(Clone, Debug, Default)]
pub(crate) struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
}

type Rgb = [u8; 3];

const PALETTE: [Rgb; 8] = [
    [0x1f, 0x77, 0xb4],
    [0xd6, 0x27, 0x28],
    [0x2c, 0xa0, 0x2c],
    [0xff, 0x7f, 0x0e],
    [0x94, 0x67, 0xbd],
    [0x8c, 0x56, 0x4b],
    [0xe3, 0x77, 0xc2],
    [0x17, 0xbe, 0xcf],
];
const BLACK: Rgb = [0, 0, 0];
const LIGHT: Rgb = [0xe6, 0xe6, 0xe6];
const MARK: Rgb = [0xaa, 0x33, 0x33];
#[cfg(test)]
const WHITE: Rgb = [0xff, 0xff, 0xff];

const W: usize = 1040;
const H: usize = 560;
/// Text scale: glyphs are 5x7 font pixels, 2 image pixels each.
const SCALE: usize = 2;
const ADVANCE: f64 = (6 * SCALE) as f64;

#[derive(Clone, Copy)]
enum Anchor {
    Start,
    Middle,
    End,
}

enum Prim {
    /// A filled square centred on `at` (a data point).
    Dot { at: (f64, f64), color: Rgb },
    Line {
        a: (f64, f64),
        b: (f64, f64),
        color: Rgb,
        width: f64,
        dashed: bool,
    },
    Text {
        at: (f64, f64),
        text: String,
        color: Rgb,
        anchor: Anchor,
    },
}

/// Round tick positions covering `[lo, hi]`, about `n` of them.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..=n * 3)
        .map(|i| first + i as f64 * step)
        .take_while(|v| *v <= hi + step * 1e-9)
        .collect()
}

/// Short tick labels: 0.5, 12, 3.5k, 1.2M, 4G.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{}{suffix}", if s == "-0" { "0" } else { s })
}

impl Chart {
    fn layout(&self) -> Vec<Prim> {
        // The legend sits in a right-hand column so it never hides curves or event labels.
        let legend_chars = self
            .series
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0)
            .min(24);
        let legend_w = if self.series.is_empty() {
            0.0
        } else {
            legend_chars as f64 * ADVANCE + 56.0
        };
        let (left, right, top, bottom) = (90.0, W as f64 - 24.0 - legend_w, 64.0, H as f64 - 56.0);
        let pts = self.series.iter().flat_map(|s| s.points.iter());
        let finite = pts.filter(|(x, y)| x.is_finite() && y.is_finite());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in finite {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        for m in &self.markers {
            if m.x.is_finite() {
                (x0, x1) = (x0.min(m.x), x1.max(m.x));
            }
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        if y1 - y0 < 1e-12 {
            (y0, y1) = (y0 - 0.5, y1 + 0.5);
        }
        let pad = (y1 - y0) * 0.05;
        (y0, y1) = (y0 - pad, y1 + pad);
        let sx = |x: f64| left + (x - x0) / (x1 - x0) * (right - left);
        let sy = |y: f64| bottom - (y - y0) / (y1 - y0) * (bottom - top);
        let mut out = Vec::new();
        let line = |a, b, color, width, dashed| Prim::Line {
            a,
            b,
            color,
            width,
            dashed,
        };
        let text = |at, text: &str, color, anchor| Prim::Text {
            at,
            text: text.to_owned(),
            color,
            anchor,
        };
        for t in ticks(y0, y1, 6) {
            let y = sy(t);
            out.push(line((left, y), (right, y), LIGHT, 1.0, false));
            out.push(text(
                (left - 8.0, y + 7.0),
                &tick_label(t),
                BLACK,
                Anchor::End,
            ));
        }
        for t in ticks(x0, x1, 8) {
            let x = sx(t);
            out.push(line((x, bottom), (x, bottom + 6.0), BLACK, 1.0, false));
            out.push(text(
                (x, bottom + 26.0),
                &tick_label(t),
                BLACK,
                Anchor::Middle,
            ));
        }
        out.push(line((left, top), (left, bottom), BLACK, 1.0, false));
        out.push(line((left, bottom), (right, bottom), BLACK, 1.0, false));
        out.push(text(
            (W as f64 / 2.0, 26.0),
            &self.title,
            BLACK,
            Anchor::Middle,
        ));
        out.push(text(
            (left, top - 10.0),
            &self.y_label,
            BLACK,
            Anchor::Start,
        ));
        out.push(text(
            ((left + right) / 2.0, H as f64 - 10.0),
            &self.x_label,
            BLACK,
            Anchor::Middle,
        ));
        // Each label goes to the first row where it overlaps no earlier label.
        let mut rows: Vec<Vec<(f64, f64)>> = Vec::new();
        for m in &self.markers {
            if !m.x.is_finite() {
                continue;
            }
            let x = sx(m.x);
            out.push(line((x, top), (x, bottom), MARK, 1.0, true));
            let len = m.label.chars().count() as f64 * ADVANCE;
            let anchor = if x + 4.0 + len > right {
                Anchor::End
            } else {
                Anchor::Start
            };
            let (tx, span) = if matches!(anchor, Anchor::End) {
                (x - 4.0, (x - 4.0 - len, x - 4.0))
            } else {
                (x + 4.0, (x + 4.0, x + 4.0 + len))
            };
            let free = |row: &Vec<(f64, f64)>| {
                row.iter()
                    .all(|(a, b)| span.1 + ADVANCE <= *a || span.0 >= *b + ADVANCE)
            };
            let r = match rows.iter().position(free) {
                Some(r) => r,
                None => {
                    rows.push(Vec::new());
                    rows.len() - 1
                }
            };
            rows[r].push(span);
            let y = top + 18.0 + (r % 8) as f64 * 18.0;
            out.push(text((tx, y), &m.label, MARK, anchor));
        }
        for (i, s) in self.series.iter().enumerate() {
            let color = if s.dashed {
                BLACK
            } else {
                PALETTE[i % PALETTE.len()]
            };
            let mut prev: Option<(f64, f64)> = None;
            for &(x, y) in &s.points {
                if !(x.is_finite() && y.is_finite()) {
                    prev = None;
                    continue;
                }
                let p = (sx(x), sy(y));
                if let Some(q) = prev {
                    out.push(line(q, p, color, 2.0, s.dashed));
                }
                if s.points.len() <= 40 {
                    out.push(Prim::Dot { at: p, color });
                }
                prev = Some(p);
            }
            // Legend, one row per series.
            let ly = top + 18.0 + i as f64 * 22.0;
            let lx = right + 16.0;
            let name: String = s.name.chars().take(24).collect();
            out.push(line(
                (lx, ly - 6.0),
                (lx + 30.0, ly - 6.0),
                color,
                3.0,
                s.dashed,
            ));
            out.push(text((lx + 36.0, ly), &name, color, Anchor::Start));
        }
        out
    }

    /// The chart as an SVG document.
    pub(crate) fn svg(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"monospace\" font-size=\"20\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n"
        );
        let hex = |c: Rgb| format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
        for p in self.layout() {
            match p {
                Prim::Dot { at, color } => {
                    let _ = writeln!(
                        s,
                        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"5\" height=\"5\" fill=\"{}\"/>",
                        at.0 - 2.5,
                        at.1 - 2.5,
                        hex(color)
                    );
                }
                Prim::Line {
                    a,
                    b,
                    color,
                    width,
                    dashed,
                } => {
                    let dash = if dashed {
                        " stroke-dasharray=\"6 4\""
                    } else {
                        ""
                    };
                    let _ = writeln!(
                        s,
                        "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"{width}\"{dash}/>",
                        a.0,
                        a.1,
                        b.0,
                        b.1,
                        hex(color)
                    );
                }
                Prim::Text {
                    at,
                    text,
                    color,
                    anchor,
                } => {
                    let anchor = match anchor {
                        Anchor::Start => "start",
                        Anchor::Middle => "middle",
                        Anchor::End => "end",
                    };
                    let _ = writeln!(
                        s,
                        "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{}\" text-anchor=\"{anchor}\">{}</text>",
                        at.0,
                        at.1,
                        hex(color),
                        escape(&text)
                    );
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }

    /// The chart as RGB pixels (`W` x `H`, row-major).
    pub(crate) fn pixels(&self) -> (usize, usize, Vec<u8>) {
        let mut img = Canvas {
            px: vec![255; W * H * 3],
        };
        for p in self.layout() {
            match p {
                Prim::Dot { at, color } => {
                    for dx in -2..=2 {
                        for dy in -2..=2 {
                            img.set(at.0.round() as i64 + dx, at.1.round() as i64 + dy, color);
                        }
                    }
                }
                Prim::Line {
                    a,
                    b,
                    color,
                    width,
                    dashed,
                } => img.line(a, b, color, width, dashed),
                Prim::Text {
                    at,
                    text,
                    color,
                    anchor,
                } => img.text(at, &text, color, anchor),
            }
        }
        (W, H, img.px)
    }

    /// The chart as a PNG file.
    pub(crate) fn png(&self) -> anyhow::Result<Vec<u8>> {
        let (w, h, px) = self.pixels();
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&px)?;
        writer.finish()?;
        Ok(out)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, a: (f64, f64), b: (f64, f64), c: Rgb, width: f64, dashed: bool) {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len = dx.hypot(dy);
        let n = len.ceil().max(1.0) as usize;
        let w = width.round().max(1.0) as i64;
        let off = (w - 1) / 2;
        for i in 0..=n {
            let t = i as f64 / n as f64;
            // Dashes: 6 px on, 4 px off, measured along the line.
            if dashed && (t * len) as usize % 10 >= 6 {
                continue;
            }
            let (x, y) = ((a.0 + dx * t).round() as i64, (a.1 + dy * t).round() as i64);
            for ox in 0..w {
                for oy in 0..w {
                    self.set(x + ox - off, y + oy - off, c);
                }
            }
        }
    }

    /// Text with its baseline at `at.1`.
    fn text(&mut self, at: (f64, f64), text: &str, c: Rgb, anchor: Anchor) {
        let width = text.chars().count() as f64 * ADVANCE;
        let x0 = match anchor {
            Anchor::Start => at.0,
            Anchor::Middle => at.0 - width / 2.0,
            Anchor::End => at.0 - width,
        }
        .round() as i64;
        let y0 = at.1.round() as i64 - (7 * SCALE) as i64;
        for (k, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x0 + (k * 6 * SCALE) as i64;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for sy in 0..SCALE {
                            for sx in 0..SCALE {
                                self.set(
                                    gx + (col * SCALE + sx) as i64,
                                    y0 + (r * SCALE + sy) as i64,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// 5x7 glyphs, one byte per row (bit 4 = leftmost column). Lower case is drawn as upper case;
/// unknown characters as a box.
fn glyph(c: char) -> [u8; 7] {
    let c = c.to_ascii_uppercase();
    let rows: [&str; 7] = match c {
        ' ' => [
            ".....", ".....", ".....", ".....", ".....", ".....", ".....",
        ],
        '0' => [
            ".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.",
        ],
        '1' => [
            "..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        '2' => [
            ".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####",
        ],
        '3' => [
            "#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###.",
        ],
        '4' => [
            "...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#.",
        ],
        '5' => [
            "#####", "#....", "####.", "....#", "....#", "#...#", ".###.",
        ],
        '6' => [
            "..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###.",
        ],
        '7' => [
            "#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#...",
        ],
        '8' => [
            ".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###.",
        ],
        '9' => [
            ".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##..",
        ],
        'A' => [
            ".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'B' => [
            "####.", "#...#", "#...#", "####.", "#...#", "#...#", "####.",
        ],
        'C' => [
            ".###.", "#...#", "#....", "#....", "#....", "#...#", ".###.",
        ],
        'D' => [
            "###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###..",
        ],
        'E' => [
            "#####", "#....", "#....", "####.", "#....", "#....", "#####",
        ],
        'F' => [
            "#####", "#....", "#....", "####.", "#....", "#....", "#....",
        ],
        'G' => [
            ".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####",
        ],
        'H' => [
            "#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'I' => [
            ".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        'J' => [
            "..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##..",
        ],
        'K' => [
            "#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#",
        ],
        'L' => [
            "#....", "#....", "#....", "#....", "#....", "#....", "#####",
        ],
        'M' => [
            "#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#",
        ],
        'N' => [
            "#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#",
        ],
        'O' => [
            ".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'P' => [
            "####.", "#...#", "#...#", "####.", "#....", "#....", "#....",
        ],
        'Q' => [
            ".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#",
        ],
        'R' => [
            "####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#",
        ],
        'S' => [
            ".####", "#....", "#....", ".###.", "....#", "....#", "####.",
        ],
        'T' => [
            "#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#..",
        ],
        'U' => [
            "#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'V' => [
            "#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#..",
        ],
        'W' => [
            "#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#.",
        ],
        'X' => [
            "#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#",
        ],
        'Y' => [
            "#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#..",
        ],
        'Z' => [
            "#####", "....#", "...#.", "..#..", ".#...", "#....", "#####",
        ],
        '.' => [
            ".....", ".....", ".....", ".....", ".....", ".##..", ".##..",
        ],
        ',' => [
            ".....", ".....", ".....", ".....", ".##..", "..#..", ".#...",
        ],
        '-' => [
            ".....", ".....", ".....", "#####", ".....", ".....", ".....",
        ],
        '+' => [
            ".....", "..#..", "..#..", "#####", "..#..", "..#..", ".....",
        ],
        ':' => [
            ".....", ".##..", ".##..", ".....", ".##..", ".##..", ".....",
        ],
        '/' => [
            ".....", "....#", "...#.", "..#..", ".#...", "#....", ".....",
        ],
        '(' => [
            "...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#.",
        ],
        ')' => [
            ".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#...",
        ],
        '%' => [
            "##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##",
        ],
        '=' => [
            ".....", ".....", "#####", ".....", "#####", ".....", ".....",
        ],
        '_' => [
            ".....", ".....", ".....", ".....", ".....", ".....", "#####",
        ],
        '\'' => [
            "..#..", "..#..", ".#...", ".....", ".....", ".....", ".....",
        ],
        '[' => [
            ".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###.",
        ],
        ']' => [
            ".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###.",
        ],
        '<' => [
            "...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#.",
        ],
        '>' => [
            ".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#...",
        ],
        '*' => [
            ".....", "..#..", "#.#.#", ".###.", "#.#.#", "..#..", ".....",
        ],
        '#' => [
            ".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#.",
        ],
        '?' => [
            ".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#..",
        ],
        '!' => [
            "..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#..",
        ],
        '"' => [
            ".#.#.", ".#.#.", ".....", ".....", ".....", ".....", ".....",
        ],
        _ => [
            "#####", "#...#", "#...#", "#...#", "#...#", "#...#", "#####",
        ],
    };
    let mut out = [0u8; 7];
    for (o, r) in out.iter_mut().zip(rows) {
        *o = r
            .bytes()
            .fold(0u8, |acc, b| (acc << 1) | u8::from(b == b'#'));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> Chart {
        Chart {
            title: "loss vs step".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![
                Series {
                    name: "local".into(),
                    points: (0..20).map(|i| (i as f64, 5.0 - i as f64 * 0.1)).collect(),
                    dashed: true,
                },
                Series {
                    name: "q8 <&>".into(),
                    points: (0..20).map(|i| (i as f64, 5.2 - i as f64 * 0.1)).collect(),
                    dashed: false,
                },
            ],
            markers: vec![Marker {
                x: 7.0,
                label: "kill peer 1".into(),
            }],
        }
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(2.31, 2.97, 6);
        assert!(t.first().unwrap() >= &2.31 && t.last().unwrap() <= &2.97 && t.len() >= 3);
        assert_eq!(tick_label(1_500_000.0), "1.5M");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(20_000.0), "20k");
    }

    #[test]
    fn svg_has_every_series_marker_and_escapes_text() {
        let svg = chart().svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("q8 &lt;&amp;&gt;"));
        assert!(svg.contains("kill peer 1"));
        assert!(svg.contains("stroke-dasharray"));
        // 19 segments per series.
        assert!(svg.matches("stroke=\"#1f77b4\"").count() == 0);
        assert!(svg.matches("stroke=\"#d62728\"").count() >= 19);
    }

    #[test]
    fn png_decodes_and_shows_the_curves() {
        let bytes = chart().png().unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width as usize, info.height as usize), (W, H));
        let px = &buf[..info.buffer_size()];
        let count = |c: Rgb| px.chunks(3).filter(|p| *p == c).count();
        // The red variant curve and its legend, the marker, and black text/axes are drawn.
        assert!(count(PALETTE[1]) > 500, "{}", count(PALETTE[1]));
        assert!(count(MARK) > 100);
        assert!(count(BLACK) > 1000);
        assert!(count(WHITE) > W * H / 2);
    }

    #[test]
    fn empty_and_degenerate_charts_still_render() {
        let mut c = Chart::default();
        assert!(c.png().is_ok());
        c.series.push(Series {
            name: "flat".into(),
            points: vec![(1.0, 2.0), (1.0, 2.0), (f64::NAN, 1.0)],
            dashed: false,
        });
        assert!(c.svg().contains("flat"));
        assert!(c.png().is_ok());
    }

    #[test]
    fn close_event_labels_do_not_overlap() {
        let mut c = chart();
        c.markers = (0..6)
            .map(|i| Marker {
                x: 3.0 + i as f64 * 0.7,
                label: format!("event number {i}"),
            })
            .collect();
        let spans: Vec<(f64, f64, f64)> = c
            .layout()
            .into_iter()
            .filter_map(|p| match p {
                Prim::Text {
                    at,
                    text,
                    color: MARK,
                    anchor,
                } => {
                    let len = text.chars().count() as f64 * ADVANCE;
                    let x0 = match anchor {
                        Anchor::Start => at.0,
                        Anchor::Middle => at.0 - len / 2.0,
                        Anchor::End => at.0 - len,
                    };
                    Some((at.1, x0, x0 + len))
                }
                _ => None,
            })
            .collect();
        assert_eq!(spans.len(), 6);
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                assert!(
                    a.0 != b.0 || a.2 <= b.1 || b.2 <= a.1,
                    "{a:?} overlaps {b:?}"
                );
            }
        }
    }

    #[test]
    fn every_glyph_is_5_by_7() {
        for c in (' '..='~').chain(['\u{e9}']) {
            let g = glyph(c);
            assert!(g.iter().all(|r| *r < 32), "{c}");
        }
        assert_ne!(glyph('a'), glyph('b'));
    }
}
