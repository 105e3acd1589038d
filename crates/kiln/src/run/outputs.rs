//! The run folder's files: history as JSON and CSV, and the loss curves as PNG and SVG. Every
//! file is written to a temporary name, then renamed.

use crate::error::{Error, Result};
use crate::model::History;
use plotters::prelude::*;
use std::path::Path;

/// Writes `history.json` (every series by name, Keras' `history.history`) and `history.csv`.
pub fn write_history(dir: impl AsRef<Path>, history: &History) -> Result<()> {
    let dir = dir.as_ref();
    let json =
        serde_json::to_string_pretty(&history.series()).map_err(|e| Error::Data(e.to_string()))?;
    crate::io::write_atomically(&dir.join("history.json"), |tmp| {
        std::fs::write(tmp, json).map_err(|source| Error::Io {
            path: tmp.to_path_buf(),
            source,
        })
    })?;
    crate::callbacks::write_history_csv(&dir.join("history.csv"), &history.epochs, 0)
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}: cannot draw the plot: {e}", path.display()))
}

/// The loss terms worth plotting: every series but the metrics (`metrics`: the model's metric
/// log names, [`crate::Model::metric_names`]; a per-class metric adds `_0`, `_1`, …) and `lr`.
fn loss_series(history: &History, metrics: &[String]) -> Vec<(String, Vec<f64>)> {
    let is_metric = |base: &str| {
        metrics.iter().any(|m| {
            base == m
                || base.strip_prefix(m.as_str()).is_some_and(|rest| {
                    rest.strip_prefix('_')
                        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                })
        })
    };
    history
        .series()
        .into_iter()
        .filter(|(k, _)| {
            let base = k.strip_prefix("val_").unwrap_or(k);
            !(base == "lr" || is_metric(base))
        })
        .collect()
}

fn draw<B: DrawingBackend>(
    root: DrawingArea<B, plotters::coord::Shift>,
    history: &History,
    metrics: &[String],
    path: &Path,
    with_text: bool,
) -> Result<()>
where
    B::ErrorType: 'static,
{
    let series = loss_series(history, metrics);
    let epochs = history.epochs.len().max(2);
    let values: Vec<f64> = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let (lo, hi) = values.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if values.is_empty() {
        (1e-3, 1.0)
    } else {
        (lo * 0.8, hi * 1.25)
    };
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(12);
    if with_text {
        builder
            .caption("loss terms per epoch", ("sans-serif", 20))
            .x_label_area_size(30)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(1f64..epochs as f64, (lo..hi).log_scale())
        .map_err(|e| plot_error(path, e))?;
    let mut mesh = chart.configure_mesh();
    if with_text {
        mesh.x_desc("epoch").y_desc("value (log)");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| plot_error(path, e))?;
    for (i, (name, v)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = if name.starts_with("val_") {
            color.stroke_width(1)
        } else {
            color.stroke_width(2)
        };
        let points: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter(|(_, y)| y.is_finite() && **y > 0.0)
            .map(|(e, y)| ((e + 1) as f64, *y))
            .collect();
        chart
            .draw_series(LineSeries::new(points, style))
            .map_err(|e| plot_error(path, e))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    if with_text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_error(path, e))?;
    }
    root.present().map_err(|e| plot_error(path, e))
}

/// Draws `loss.svg` and `loss.png`: one line per loss term (validation twins thinner), log
/// scale, in the same colors in both files. The PNG carries no text, so no font is needed to
/// draw it; the SVG has the title, axis names, tick labels and the legend. `metrics` are the
/// model's metric names ([`crate::Model::metric_names`]): their series are not loss terms.
pub fn write_loss_plots(
    dir: impl AsRef<Path>,
    history: &History,
    metrics: &[String],
) -> Result<()> {
    let dir = dir.as_ref();
    let svg = dir.join("loss.svg");
    crate::io::write_atomically(&svg, |tmp| {
        draw(
            SVGBackend::new(tmp, (800, 500)).into_drawing_area(),
            history,
            metrics,
            &svg,
            true,
        )
    })?;
    let png = dir.join("loss.png");
    crate::io::write_atomically(&png, |tmp| {
        // The bitmap encoder picks the format from the extension: give the temporary file one.
        let tmp_png = tmp.with_extension("png");
        draw(
            BitMapBackend::new(&tmp_png, (800, 500)).into_drawing_area(),
            history,
            metrics,
            &png,
            false,
        )?;
        std::fs::rename(&tmp_png, tmp).map_err(|source| Error::Io {
            path: tmp.to_path_buf(),
            source,
        })
    })
}
