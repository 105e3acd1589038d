//! The run folder's files: history as JSON and CSV, and the loss (and metric) curves as PNG
//! and SVG. Every file is written to a temporary name, then renamed.

use crate::error::{Error, Result};
use crate::model::History;
use crate::plot::Figure;
use plotters::prelude::*;
use std::path::Path;

/// Writes `history.json` (every series by name, Keras' `history.history`) and `history.csv`.
pub fn write_history(dir: impl AsRef<Path>, history: &History) -> Result<()> {
    let dir = dir.as_ref();
    let json =
        serde_json::to_string_pretty(&history.series()).map_err(|e| Error::Data(e.to_string()))?;
    crate::io::write_atomically(dir.join("history.json"), |tmp| {
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

/// Series that are neither losses nor metrics: the learning rate and the epoch's duration.
fn is_bookkeeping(name: &str) -> bool {
    matches!(name, "learning_rate" | "epoch_time_s")
}

/// Gradient diagnostics (`grad_norm/<term>`, `grad_cos/<a>/<b>`, and their `val_` twins):
/// plotted on their own.
fn is_diagnostic(name: &str) -> bool {
    is_norm(name) || is_cosine(name)
}

/// A gradient norm, on the training or the validation data (drawn dashed, as `val_` series).
fn is_norm(name: &str) -> bool {
    name.strip_prefix("val_")
        .unwrap_or(name)
        .starts_with("grad_norm/")
}

/// A gradient cosine, on the training or the validation data.
fn is_cosine(name: &str) -> bool {
    name.strip_prefix("val_")
        .unwrap_or(name)
        .starts_with("grad_cos/")
}

/// The figures of a run: the loss terms, and the metrics when there are any.
fn figures(history: &History, metrics: &[String]) -> Vec<(&'static str, Figure)> {
    // A metric with one value per class logs `<name>_0`, `<name>_1`, …
    let is_metric = |name: &str| {
        let base = crate::plot::term_of(name);
        metrics.iter().any(|m| {
            base == m
                || base.strip_prefix(m.as_str()).is_some_and(|rest| {
                    rest.strip_prefix('_')
                        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                })
        })
    };
    // A loss weighting strategy's weights (`loss_weight/<term>`) have their own figure.
    let is_weight = |name: &str| name.starts_with("loss_weight/");
    let other = |n: &str| is_bookkeeping(n) || is_diagnostic(n) || is_weight(n);
    let losses = crate::plot::select(history, |n| !other(n) && !is_metric(n));
    let metric_series = crate::plot::select(history, |n| !other(n) && is_metric(n));
    let weight_series = crate::plot::select(history, is_weight);
    let mut out = vec![(
        "loss",
        Figure {
            title: "Loss terms per epoch".into(),
            y_desc: "loss".into(),
            series: losses,
        },
    )];
    if !weight_series.is_empty() {
        out.push((
            "loss_weights",
            Figure {
                title: "Loss weights per epoch".into(),
                y_desc: "weight".into(),
                series: weight_series,
            },
        ));
    }
    if !metric_series.is_empty() {
        out.push((
            "metrics",
            Figure {
                title: "Metrics per epoch".into(),
                y_desc: "value".into(),
                series: metric_series,
            },
        ));
    }
    let norms = crate::plot::select(history, is_norm);
    if !norms.is_empty() {
        out.push((
            "grad_norm",
            Figure {
                title: "Gradient norm of each term over the shared weights".into(),
                y_desc: "gradient L2 norm".into(),
                series: norms,
            },
        ));
    }
    let cosines = crate::plot::select(history, is_cosine);
    if !cosines.is_empty() {
        out.push((
            "grad_cos",
            Figure {
                title: "Gradient cosine between terms over the shared weights".into(),
                y_desc: "cosine".into(),
                series: cosines,
            },
        ));
    }
    out
}

/// The size of every plot, in pixels (SVG user units).
const SIZE: (u32, u32) = (960, 540);

/// Draws `loss.svg` and `loss.png` (every loss term: `loss`, per-output losses, added terms,
/// and their `val_` twins), `metrics.svg` and `metrics.png` when `metrics` names series of
/// the history (the compiled metrics' names, e.g. `accuracy`), and with gradient diagnostics
/// `grad_norm.svg`/`.png` (each term's gradient norm, in the term's colour) and
/// `grad_cos.svg`/`.png` (the cosine of every pair of terms), validation diagnostics dashed
/// beside them. Both formats hold the same
/// drawing, text included: the PNG's font ships with kiln. `learning_rate` and `epoch_time_s` are not
/// plotted. Each file is written whole or not at all.
///
/// ```
/// let mut history = kiln::History::default();
/// for (loss, l2) in [(0.9, 2e-3), (0.5, 1.5e-3)] {
///     let mut logs = kiln::Logs::default();
///     logs.set("loss", loss);
///     logs.set("l2", l2);
///     history.epochs.push(logs);
/// }
/// let dir = std::env::temp_dir().join(format!("kiln-doc-plots-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// kiln::run::write_plots(&dir, &history, &[])?;
/// let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
/// assert!(svg.contains("l2") && svg.contains("Loss terms per epoch"));
/// assert!(!dir.join("metrics.svg").exists());
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn write_plots(dir: impl AsRef<Path>, history: &History, metrics: &[String]) -> Result<()> {
    let dir = dir.as_ref();
    for (stem, figure) in figures(history, metrics) {
        let svg = dir.join(format!("{stem}.svg"));
        crate::io::write_atomically(&svg, |tmp| {
            let root = SVGBackend::new(tmp, SIZE).into_drawing_area();
            crate::plot::draw(&root, &figure).map_err(|e| plot_error(&svg, e))?;
            root.present().map_err(|e| plot_error(&svg, e))
        })?;
        let png = dir.join(format!("{stem}.png"));
        crate::io::write_atomically(&png, |tmp| {
            // The bitmap encoder picks the format from the extension: give the temporary one.
            let tmp_png = tmp.with_extension("png");
            {
                let root =
                    crate::plot::GlyphText(BitMapBackend::new(&tmp_png, SIZE)).into_drawing_area();
                crate::plot::draw(&root, &figure).map_err(|e| plot_error(&png, e))?;
                root.present().map_err(|e| plot_error(&png, e))?;
            }
            std::fs::rename(&tmp_png, tmp).map_err(|source| Error::Io {
                path: tmp.to_path_buf(),
                source,
            })
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Logs;

    /// The texts of an SVG drawing, trimmed, in order.
    pub(crate) fn svg_texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>').map(|(_, rest)| rest))
            .filter_map(|rest| {
                rest.split_once("</text>")
                    .map(|(text, _)| text.trim().to_string())
            })
            .collect()
    }

    /// A history from named series (all of the same length).
    pub(crate) fn history(series: &[(&str, Vec<f64>)]) -> History {
        let n = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
        let mut h = History::default();
        for e in 0..n {
            let mut logs = Logs::default();
            for (name, v) in series {
                logs.set(*name, v[e]);
            }
            h.epochs.push(logs);
        }
        h
    }

    fn curve(n: usize, f: impl Fn(f64) -> f64) -> Vec<f64> {
        (0..n).map(|e| f(e as f64)).collect()
    }

    /// The scenarios a person meets, drawn where `KILN_KEEP_PLOTS` says (to look at them), or
    /// in a temporary folder.
    fn scenarios() -> Vec<(&'static str, History, Vec<String>)> {
        let decay = |n: usize, from: f64, to: f64| {
            curve(n, move |e| {
                to + (from - to) * (-(e / (n as f64 / 5.0))).exp()
            })
        };
        let wobble = |v: Vec<f64>, amp: f64| -> Vec<f64> {
            v.iter()
                .enumerate()
                .map(|(i, x)| x * (1.0 + amp * ((i as f64 * 1.7).sin())))
                .collect()
        };
        let mut many: Vec<(&str, Vec<f64>)> = vec![
            ("loss", decay(40, 2.5, 0.4)),
            ("digit_loss", decay(40, 2.0, 0.3)),
            ("parity_loss", decay(40, 0.7, 0.1)),
            ("l2", decay(40, 3e-3, 1e-3)),
            ("l1", decay(40, 2e-2, 8e-3)),
            ("fgsm", decay(40, 0.4, 0.08)),
            ("sparsity", decay(40, 5e-4, 2e-4)),
            ("activity_l2", decay(40, 1e-2, 5e-3)),
            ("orthogonal", decay(40, 0.05, 0.04)),
        ];
        let vals: Vec<(String, Vec<f64>)> = many
            .iter()
            .map(|(n, v)| (format!("val_{n}"), wobble(v.clone(), 0.05)))
            .collect();
        let vals: Vec<(&str, Vec<f64>)> = vals
            .iter()
            .map(|(n, v)| (&*Box::leak(n.clone().into_boxed_str()), v.clone()))
            .collect();
        many.extend(vals);
        let mut nan = decay(12, 1.0, 0.2);
        nan[4] = f64::NAN;
        nan[8] = f64::INFINITY;
        vec![
            (
                "one_epoch",
                history(&[
                    ("loss", vec![0.7]),
                    ("l2", vec![1e-3]),
                    ("val_loss", vec![0.8]),
                ]),
                vec![],
            ),
            (
                "two_epochs",
                history(&[("loss", vec![0.7, 0.5]), ("val_loss", vec![0.8, 0.6])]),
                vec![],
            ),
            (
                "three_epochs",
                history(&[
                    ("loss", vec![0.7, 0.5, 0.45]),
                    ("l2", vec![1.2e-3, 1.1e-3, 1.05e-3]),
                    ("accuracy", vec![0.6, 0.8, 0.85]),
                    ("val_loss", vec![0.8, 0.6, 0.55]),
                    ("val_l2", vec![1.2e-3, 1.1e-3, 1.05e-3]),
                    ("val_accuracy", vec![0.55, 0.75, 0.8]),
                    ("epoch_time_s", vec![0.1, 0.1, 0.1]),
                ]),
                vec!["accuracy".to_string()],
            ),
            (
                "long_run",
                history(&[
                    ("loss", wobble(decay(300, 0.9, 0.3), 0.02)),
                    ("l2", decay(300, 2e-3, 9e-4)),
                    ("fgsm", wobble(decay(300, 0.2, 0.06), 0.03)),
                    ("val_loss", wobble(decay(300, 1.0, 0.35), 0.04)),
                    ("val_l2", decay(300, 2e-3, 9e-4)),
                    ("val_fgsm", wobble(decay(300, 0.25, 0.08), 0.05)),
                    ("learning_rate", vec![1e-3; 300]),
                ]),
                vec![],
            ),
            (
                "regularizer_beside_total",
                history(&[
                    ("loss", wobble(decay(20, 0.6, 0.45), 0.01)),
                    ("l2", decay(20, 1.2e-3, 9e-4)),
                    ("val_loss", wobble(decay(20, 0.65, 0.5), 0.02)),
                    ("val_l2", decay(20, 1.2e-3, 9e-4)),
                ]),
                vec![],
            ),
            (
                "to_1e-6",
                history(&[
                    ("loss", curve(60, |e| 0.5 * (-(e * 0.22)).exp())),
                    ("val_loss", curve(60, |e| 0.6 * (-(e * 0.2)).exp())),
                ]),
                vec![],
            ),
            (
                "non_finite",
                history(&[("loss", nan), ("val_loss", decay(12, 1.1, 0.25))]),
                vec![],
            ),
            (
                "linear_only",
                history(&[
                    ("loss", decay(15, 0.9, 0.34)),
                    ("val_loss", decay(15, 0.92, 0.4)),
                ]),
                vec![],
            ),
            (
                "negative",
                history(&[
                    ("loss", decay(15, -0.5, -0.9)),
                    ("l2", decay(15, 2e-2, 1e-2)),
                ]),
                vec![],
            ),
            ("many_terms", history(&many), vec![]),
        ]
    }

    /// The PNG's drawing has text: dark (near-black) pixels in the legend column, where only
    /// the names are black (the line samples are coloured), and in the title band; none in an
    /// empty corner of the legend column below the entries.
    #[test]
    fn the_png_has_text_where_the_legend_and_title_are() {
        let history = history(&[
            ("loss", vec![0.9, 0.6, 0.5]),
            ("l2", vec![2e-3, 1.5e-3, 1e-3]),
            ("val_loss", vec![1.0, 0.7, 0.6]),
        ]);
        let (w, h) = SIZE;
        let mut buf = vec![0u8; (w * h * 3) as usize];
        {
            let root = crate::plot::GlyphText(BitMapBackend::with_buffer(&mut buf, SIZE))
                .into_drawing_area();
            let (_, figure) = figures(&history, &[]).remove(0);
            crate::plot::draw(&root, &figure).unwrap();
            root.present().unwrap();
        }
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            let mut n = 0;
            for y in y0..y1 {
                for x in x0..x1 {
                    let i = ((y * w + x) * 3) as usize;
                    if buf[i] < 90 && buf[i + 1] < 90 && buf[i + 2] < 90 {
                        n += 1;
                    }
                }
            }
            n
        };
        let legend_text = dark(w - 120, w, 30, 110);
        assert!(legend_text > 150, "legend: {legend_text} dark pixels");
        assert_eq!(dark(w - 120, w, 300, 500), 0, "below the legend");
        let title = dark(w / 2 - 150, w / 2 + 150, 0, 30);
        assert!(title > 150, "title: {title} dark pixels");
        // Not blank: most of it is white, but not all.
        let white = buf
            .chunks(3)
            .filter(|p| p.iter().all(|c| *c == 255))
            .count();
        assert!(white < (w * h) as usize && white > (w * h / 2) as usize);
    }

    #[test]
    fn every_scenario_draws_readable_plots() {
        let keep = std::env::var_os("KILN_KEEP_PLOTS");
        let root = match &keep {
            Some(d) => std::path::PathBuf::from(d),
            None => std::env::temp_dir().join(format!("kiln-plots-{}", std::process::id())),
        };
        for (name, history, metrics) in scenarios() {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            write_plots(&dir, &history, &metrics).unwrap();
            let texts = svg_texts(&std::fs::read_to_string(dir.join("loss.svg")).unwrap());
            let has = |t: &str| texts.iter().any(|x| x == t);
            assert!(has("Loss terms per epoch"), "{name}: title in {texts:?}");
            assert!(has("epoch"), "{name}: x axis name");
            assert!(
                has("loss") || has("loss (log scale)"),
                "{name}: y axis name"
            );
            for key in history.series().keys() {
                let base = crate::plot::term_of(key);
                let in_loss = !metrics.iter().any(|m| m == base)
                    && key != "learning_rate"
                    && key != "epoch_time_s";
                let named = texts
                    .iter()
                    .any(|t| t == key || t.starts_with(&format!("{key} (")));
                assert_eq!(named, in_loss, "{name}: legend entry {key} in {texts:?}");
            }
            let png = std::fs::read(dir.join("loss.png")).unwrap();
            assert_eq!(&png[1..4], b"PNG", "{name}");
            assert_eq!(
                dir.join("metrics.svg").exists(),
                !metrics.is_empty(),
                "{name}"
            );
            if !metrics.is_empty() {
                let texts = svg_texts(&std::fs::read_to_string(dir.join("metrics.svg")).unwrap());
                assert!(texts.iter().any(|t| t == "Metrics per epoch"), "{texts:?}");
                assert!(texts.iter().any(|t| t == "val_accuracy"), "{texts:?}");
                assert!(dir.join("metrics.png").exists());
            }
        }
        if keep.is_none() {
            std::fs::remove_dir_all(&root).ok();
        }
    }
}
