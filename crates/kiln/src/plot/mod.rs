//! Training curves as a person reads them: a title, named axes, round ticks, a legend, one
//! colour per term (train solid, `val_` dashed), and a log axis whenever the curves span more
//! than a factor of 20, so an added term near 1e-3 reads beside a total near 0.5 in the same
//! panel, on the same scale as the total it is part of. The same drawing goes to SVG and PNG;
//! the PNG's text uses the DejaVu Sans subset shipped in `assets/fonts` (no system font).

mod colors;
mod text;
mod ticks;

use crate::model::History;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::ops::Range;
use ticks::{epoch_ticks, ValueAxis};

pub(crate) use colors::term_of;
pub(crate) use text::GlyphText;

/// DejaVu Sans, cut to Latin-1 and a few symbols (see `assets/fonts/LICENSE-DejaVu.txt`).
const FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-kiln-subset.ttf");

/// The font family every text of a plot uses; registered once from the bytes kiln ships.
const FONT: &str = "sans-serif";

/// Registers the shipped font with plotters (once per process).
pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid font: the tests draw with it.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
}

/// One curve: a history series by name.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) values: Vec<f64>,
}

/// What one plot file shows.
pub(crate) struct Figure {
    pub(crate) title: String,
    /// The value axis' name; " (log scale)" is added when the axis is logarithmic.
    pub(crate) y_desc: String,
    pub(crate) series: Vec<Series>,
}

/// The series of `history` whose names `keep` accepts, each `val_` twin right after its term,
/// in the order the names first appear (loss, per-output losses, added terms, metrics).
pub(crate) fn select(history: &History, keep: impl Fn(&str) -> bool) -> Vec<Series> {
    let mut names: Vec<String> = Vec::new();
    for logs in &history.epochs {
        for k in logs.keys() {
            if keep(k) && !names.iter().any(|n| n == k) {
                names.push(k.to_string());
            }
        }
    }
    let (train, val): (Vec<String>, Vec<String>) =
        names.into_iter().partition(|n| !n.starts_with("val_"));
    let mut ordered: Vec<String> = Vec::new();
    for t in &train {
        ordered.push(t.clone());
        if let Some(v) = val.iter().find(|v| term_of(v) == t.as_str()) {
            ordered.push(v.clone());
        }
    }
    // A `val_` series without its train twin (possible with callbacks that add logs).
    ordered.extend(
        val.into_iter()
            .filter(|v| !train.iter().any(|t| t == term_of(v))),
    );
    ordered
        .into_iter()
        .map(|name| Series {
            values: history
                .epochs
                .iter()
                .map(|l| l.get(&name).unwrap_or(f64::NAN))
                .collect(),
            name,
        })
        .collect()
}

/// The pieces of a curve between values the axis cannot show (NaN, ±inf, ≤ 0 on a log axis):
/// a gap, never a line through a made-up value.
fn segments(values: &[f64], axis: &ValueAxis) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (i, &v) in values.iter().enumerate() {
        if axis.shows(v) {
            if let Some(last) = out.last_mut() {
                last.push(((i + 1) as f64, axis.place(v)));
            }
        } else if out.last().is_some_and(|s| !s.is_empty()) {
            out.push(Vec::new());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The "on" pieces of a dashed line along the polyline `points` (pixels): `on` pixels drawn,
/// `off` skipped, the pattern running on across the polyline's corners.
fn dashes(points: &[(f64, f64)], on: f64, off: f64) -> Vec<Vec<(i32, i32)>> {
    let px = |(x, y): (f64, f64)| (x.round() as i32, y.round() as i32);
    let mut out: Vec<Vec<(i32, i32)>> = Vec::new();
    let mut drawing = true;
    let mut left = on;
    let mut current: Vec<(i32, i32)> = points.first().map(|&p| vec![px(p)]).unwrap_or_default();
    for w in points.windows(2) {
        let (mut a, b) = (w[0], w[1]);
        let mut length = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
        while length > 0.0 {
            let step = left.min(length);
            let t = step / length;
            let p = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
            if drawing {
                current.push(px(p));
            }
            length -= step;
            left -= step;
            a = p;
            if left <= 0.0 {
                if drawing {
                    out.push(std::mem::take(&mut current));
                } else {
                    current = vec![px(p)];
                }
                drawing = !drawing;
                left = if drawing { on } else { off };
            }
        }
    }
    if drawing && current.len() > 1 {
        out.push(current);
    }
    out
}

/// A legend entry's text: the name, and how many values could not be drawn.
fn legend_label(series: &Series, axis: &ValueAxis) -> String {
    let hidden = series.values.iter().filter(|v| !axis.shows(**v)).count();
    let non_finite = series.values.iter().filter(|v| !v.is_finite()).count();
    match (hidden, non_finite) {
        (0, _) => series.name.clone(),
        (h, n) if h == n => {
            let what = if series.values.iter().any(|v| v.is_nan()) {
                "NaN/inf"
            } else {
                "inf"
            };
            format!("{} ({n} {what})", series.name)
        }
        (h, _) => format!("{} ({h} not drawn)", series.name),
    }
}

/// A linear coordinate whose grid lines sit exactly at the ticks kiln chose (plotters' own
/// numeric axes choose their own, and its key-point wrapper cannot format f64 labels).
#[derive(Debug, Clone)]
struct Ticked {
    range: Range<f64>,
    major: Vec<f64>,
    minor: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let t = (value - self.range.start) / (self.range.end - self.range.start);
        let t = if t.is_finite() {
            t.clamp(-1.0, 2.0)
        } else {
            0.5
        };
        limit.0 + ((limit.1 - limit.0) as f64 * t).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.minor.clone()
        } else {
            self.major.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

type DrawResult<B> = Result<(), DrawingAreaErrorKind<<B as DrawingBackend>::ErrorType>>;

/// Draws `figure` on `root`, whatever the backend (SVG or bitmap).
pub(crate) fn draw<B: DrawingBackend>(
    root: &DrawingArea<B, Shift>,
    figure: &Figure,
) -> DrawResult<B> {
    register_font();
    root.fill(&WHITE)?;
    let epochs = figure
        .series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(0);
    let finite: Vec<f64> = figure
        .series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let (min, max) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let axis = if finite.is_empty() {
        ValueAxis::fit(0.0, 1.0)
    } else {
        ValueAxis::fit(min, max)
    };

    let label_font = TextStyle::from((FONT, 15).into_font());
    let title = root.titled(&figure.title, (FONT, 22))?;
    let (width, height) = title.dim_in_pixel();

    // The legend column: as wide as its longest entry, at most a third of the figure.
    let labels: Vec<String> = figure
        .series
        .iter()
        .map(|s| legend_label(s, &axis))
        .collect();
    let text_width = |s: &str, font: &TextStyle| -> u32 {
        root.estimate_text_size(s, font)
            .map(|(w, _)| w)
            .unwrap_or(8 * s.len() as u32)
    };
    let max_label = labels
        .iter()
        .map(|l| text_width(l, &label_font))
        .max()
        .unwrap_or(0);
    let legend_width = (max_label + 56).clamp(120, width / 3);
    let (plot_area, legend_area) = title.split_horizontally(width - legend_width);

    let y_ticks: Vec<f64> = axis.major.iter().map(|t| axis.place(t.value)).collect();
    let y_minor: Vec<f64> = axis.minor.iter().map(|v| axis.place(*v)).collect();
    let y_label_width = axis
        .major
        .iter()
        .map(|t| text_width(&t.label, &label_font))
        .max()
        .unwrap_or(0);
    let x_ticks: Vec<f64> = epoch_ticks(epochs, 10)
        .into_iter()
        .map(|e| e as f64)
        .collect();
    let x_pad = if epochs <= 1 {
        0.5
    } else {
        0.1 + 0.03 * (epochs - 1) as f64
    };
    let (x_lo, x_hi) = (1.0 - x_pad, epochs.max(1) as f64 + x_pad);

    let mut chart = ChartBuilder::on(&plot_area)
        .margin_top(8)
        .margin_bottom(12)
        .margin_right(16)
        .margin_left(8)
        .x_label_area_size(60)
        .y_label_area_size(y_label_width + 44)
        .build_cartesian_2d(
            Ticked {
                range: x_lo..x_hi,
                major: x_ticks,
                minor: Vec::new(),
            },
            Ticked {
                range: axis.place(axis.lo)..axis.place(axis.hi),
                major: y_ticks,
                minor: y_minor.clone(),
            },
        )?;
    let y_label = |v: &f64| {
        axis.major
            .iter()
            .min_by(|a, b| {
                (axis.place(a.value) - v)
                    .abs()
                    .total_cmp(&(axis.place(b.value) - v).abs())
            })
            .map(|t| t.label.clone())
            .unwrap_or_default()
    };
    let x_label = |v: &f64| format!("{}", v.round() as i64);
    let y_desc = if axis.log {
        format!("{} (log scale)", figure.y_desc)
    } else {
        figure.y_desc.clone()
    };
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style(label_font.clone())
        .axis_desc_style((FONT, 16))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(BLACK.mix(0.05))
        .axis_style(BLACK.mix(0.8))
        .draw()?;

    // Minor tick marks on the value axis (the light grid lines alone are faint).
    let (plot_w, _) = chart.plotting_area().dim_in_pixel();
    let dx = (x_hi - x_lo) * 5.0 / plot_w.max(1) as f64;
    chart.draw_series(
        y_minor
            .iter()
            .map(|&y| PathElement::new(vec![(x_lo, y), (x_lo + dx, y)], BLACK.mix(0.6))),
    )?;

    let colours = colors::assign(figure.series.iter().map(|s| term_of(&s.name)));
    let colour_of = |name: &str| {
        colours
            .iter()
            .find(|(n, _)| n == term_of(name))
            .map(|(_, c)| *c)
            .unwrap_or(colors::LOSS)
    };
    let markers = epochs <= 30;
    for series in &figure.series {
        let colour = colour_of(&series.name);
        let dashed = series.name.starts_with("val_");
        let style = colour.stroke_width(2);
        for segment in segments(&series.values, &axis) {
            if dashed {
                // Dashed in pixels along the whole curve: plotters restarts the pattern at each
                // point, which turns a 300-epoch curve into noise.
                let pixels: Vec<(f64, f64)> = segment
                    .iter()
                    .map(|p| {
                        let (x, y) = chart.backend_coord(p);
                        (x as f64, y as f64)
                    })
                    .collect();
                for dash in dashes(&pixels, 7.0, 5.0) {
                    root.draw(&PathElement::new(dash, style))?;
                }
            } else {
                chart.draw_series(LineSeries::new(segment.clone(), style))?;
            }
            // Points alone (a one-epoch run, a value between two NaNs) need a mark to be seen.
            if markers || segment.len() == 1 {
                let fill = if dashed {
                    WHITE.filled()
                } else {
                    colour.filled()
                };
                chart.draw_series(segment.iter().map(|&p| Circle::new(p, 3, fill)))?;
                chart.draw_series(segment.iter().map(|&p| Circle::new(p, 3, style)))?;
            }
        }
    }
    if finite.is_empty() {
        chart.draw_series(std::iter::once(Text::new(
            "no finite values to draw",
            ((x_lo + x_hi) / 2.0, axis.place((axis.lo + axis.hi) / 2.0)),
            label_font.clone(),
        )))?;
    }

    draw_legend(&legend_area, figure, &labels, height, &colour_of)
}

/// The legend, in its own column beside the plot so it never hides a curve: a line sample
/// (solid for training, dashed for validation) and the series' name per row.
fn draw_legend<B: DrawingBackend>(
    area: &DrawingArea<B, Shift>,
    figure: &Figure,
    labels: &[String],
    height: u32,
    colour_of: &dyn Fn(&str) -> RGBColor,
) -> DrawResult<B> {
    let rows = figure.series.len().max(1) as u32;
    let top = 12;
    let row = ((height.saturating_sub(top + 40)) / rows).clamp(8, 24) as i32;
    let size = (row - 6).clamp(9, 15);
    let font = TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let (width, _) = area.dim_in_pixel();
    for (i, (series, label)) in figure.series.iter().zip(labels).enumerate() {
        let y = top as i32 + row / 2 + i as i32 * row;
        let style = colour_of(&series.name).stroke_width(2);
        let (x0, x1) = (6, 36);
        if series.name.starts_with("val_") {
            for dash in dashes(&[(x0 as f64, y as f64), (x1 as f64, y as f64)], 7.0, 5.0) {
                area.draw(&PathElement::new(dash, style))?;
            }
        } else {
            area.draw(&PathElement::new(vec![(x0, y), (x1, y)], style))?;
        }
        let text = fit_text(label, width.saturating_sub(50), |s| {
            area.estimate_text_size(s, &font)
                .map(|(w, _)| w)
                .unwrap_or(0)
        });
        area.draw(&Text::new(text, (x1 + 8, y), font.clone()))?;
    }
    Ok(())
}

/// `text`, cut with an ellipsis if it is wider than `max` pixels.
fn fit_text(text: &str, max: u32, width: impl Fn(&str) -> u32) -> String {
    if width(text) <= max {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    for n in (1..chars.len()).rev() {
        let cut: String = chars[..n].iter().collect::<String>() + "…";
        if width(&cut) <= max {
            return cut;
        }
    }
    "…".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashes_run_on_across_corners() {
        // 24 px straight, then 24 px down: 7 on, 5 off, the pattern running on.
        let d = dashes(&[(0.0, 0.0), (24.0, 0.0), (24.0, 24.0)], 7.0, 5.0);
        assert_eq!(d[0], [(0, 0), (7, 0)]);
        assert_eq!(d[1], [(12, 0), (19, 0)]);
        assert_eq!(d[2], [(24, 0), (24, 7)]);
        assert_eq!(d.len(), 4);
        assert_eq!(d[3], [(24, 12), (24, 19)]);
        // A dash that reaches a corner turns it.
        let d = dashes(&[(0.0, 0.0), (10.0, 0.0), (10.0, 20.0)], 7.0, 1.0);
        assert_eq!(d[1], [(8, 0), (10, 0), (10, 5)]);
        // Many short pieces (a long run): the same pattern as one straight line.
        let fine: Vec<(f64, f64)> = (0..=48).map(|i| (i as f64 * 0.5, 0.0)).collect();
        let straight = dashes(&[(0.0, 0.0), (24.0, 0.0)], 7.0, 5.0);
        let ends = |v: &[Vec<(i32, i32)>]| -> Vec<((i32, i32), (i32, i32))> {
            v.iter().map(|d| (d[0], *d.last().unwrap())).collect()
        };
        assert_eq!(ends(&dashes(&fine, 7.0, 5.0)), ends(&straight));
    }

    #[test]
    fn gaps_are_left_where_values_cannot_be_drawn() {
        let axis = ValueAxis::fit(0.1, 10.0);
        assert!(axis.log);
        let s = segments(&[1.0, f64::NAN, 2.0, 3.0, f64::INFINITY, 0.0, 4.0], &axis);
        let epochs: Vec<Vec<f64>> = s
            .iter()
            .map(|seg| seg.iter().map(|p| p.0).collect())
            .collect();
        assert_eq!(epochs, [vec![1.0], vec![3.0, 4.0], vec![7.0]]);
        let series = Series {
            name: "loss".into(),
            values: vec![1.0, f64::NAN, f64::INFINITY],
        };
        assert_eq!(legend_label(&series, &axis), "loss (2 NaN/inf)");
    }
}
