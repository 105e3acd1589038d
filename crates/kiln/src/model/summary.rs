//! `Model::summary`: the layers, their output shapes and parameter counts, as Keras prints them.

use super::Model;
use crate::graph::NodeOp;
use std::fmt::Write;

/// Keras' class name for a layer kind: `dense` → `Dense`, `max_pooling2d` → `MaxPooling2D`.
fn class_name(kind: &str) -> String {
    match kind {
        "lstm" => return "LSTM".into(),
        "gru" => return "GRU".into(),
        _ => {}
    }
    let mut out = String::new();
    for part in kind.split('_') {
        let mut after_digit = false;
        for (i, c) in part.chars().enumerate() {
            out.push(if i == 0 || after_digit {
                c.to_ascii_uppercase()
            } else {
                c
            });
            after_digit = c.is_ascii_digit();
        }
    }
    out
}

/// `(None, 8)`, as Keras writes a batch-first shape.
fn shape_text(shape: &[usize]) -> String {
    let dims: Vec<String> = std::iter::once("None".to_string())
        .chain(shape.iter().map(usize::to_string))
        .collect();
    match dims.len() {
        1 => "(None,)".into(),
        _ => format!("({})", dims.join(", ")),
    }
}

/// Keras' `readable_memory_size`: bytes in B, KB, MB, GB (powers of 1024), two decimals.
fn memory_text(bytes: usize) -> String {
    let mut size = bytes as f64;
    for unit in ["B", "KB", "MB", "GB"] {
        if size < 1024.0 || unit == "GB" {
            return format!("{size:.2} {unit}");
        }
        size /= 1024.0;
    }
    unreachable!("the loop returns at GB")
}

/// `1,234,567`, as Keras groups the counts.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Model {
    /// A table of the model, as Keras' `model.summary()` prints it: every layer with its type,
    /// output shape and parameter count (and, when the graph is not a plain chain, what each
    /// layer is connected to), then the total, trainable and non-trainable parameter counts.
    /// Frozen layers' weights count as non-trainable, as in Keras.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let h = Dense::new(8).with_name("hidden").trainable(false).apply(&x)?;
    /// let y = Dense::new(1).with_name("out").apply(&h)?;
    /// let model = Model::new(&[x], &[y])?;
    /// let table = model.summary();
    /// println!("{table}");
    /// assert!(table.contains("hidden (Dense)"));
    /// assert!(table.contains("(None, 8)"));
    /// assert!(table.contains("Total params: 49 (196.00 B)"));
    /// assert!(table.contains("Trainable params: 9 (36.00 B)"));
    /// assert!(table.contains("Non-trainable params: 40 (160.00 B)"));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn summary(&self) -> String {
        // One row per input and per layer (its first application).
        let mut rows: Vec<[String; 4]> = Vec::new();
        // Each tensor as Keras' "Connected to" column names it: `layer[node][output]`.
        let mut names_of: std::collections::HashMap<usize, String> = Default::default();
        let mut applied: std::collections::HashMap<usize, usize> = Default::default();
        let mut node_of = |key: usize| {
            let n = applied.entry(key).or_insert(0);
            *n += 1;
            *n - 1
        };
        for (sym, name) in self.inputs.iter().zip(&self.input_names) {
            names_of.insert(sym.id(), format!("{name}[0][0]"));
            rows.push([
                format!("{name} (InputLayer)"),
                shape_text(sym.shape()),
                "0".into(),
                "-".into(),
            ]);
        }
        let mut chain = self.inputs.len() == 1;
        let mut previous = self.inputs.first().map(|i| i.id());
        let mut seen = std::collections::HashSet::new();
        // A nested model is one row, and each of its applications one node.
        let mut applications = std::collections::HashSet::new();
        for step in &self.steps {
            if let Some(app) = step.node.0.within.first() {
                let name = self
                    .nesting
                    .models
                    .iter()
                    .find(|(_, s)| s.id == app.scope.id)
                    .map_or("?", |(n, _)| n.as_str());
                let outputs = app.output_ids();
                if !applications.insert(app.id) {
                    continue;
                }
                let k = node_of(app.scope.id);
                for (j, id) in outputs.iter().enumerate() {
                    names_of.insert(*id, format!("{name}[{k}][{j}]"));
                }
                if app.inputs.len() != 1 || Some(app.inputs[0].id()) != previous {
                    chain = false;
                }
                previous = outputs.first().copied();
                if !seen.insert(app.scope.id) {
                    continue;
                }
                let params: usize = app
                    .scope
                    .layers
                    .iter()
                    .flat_map(|l| l.lock().weights())
                    .map(|w| w.var.elem_count())
                    .sum();
                let shapes: Vec<String> = app
                    .scope
                    .outputs
                    .iter()
                    .map(|o| shape_text(o.shape()))
                    .collect();
                let connected: Vec<String> = app
                    .inputs
                    .iter()
                    .map(|i| names_of.get(&i.id()).map_or("?", |s| s).to_string())
                    .collect();
                rows.push([
                    format!("{name} (Functional)"),
                    shapes.join(", "),
                    grouped(params),
                    connected.join(", "),
                ]);
                continue;
            }
            let k = node_of(step.layer.id);
            let ids = std::iter::once(step.node.id()).chain(step.node.others().iter().map(|o| o.0));
            for (j, id) in ids.enumerate() {
                names_of.insert(id, format!("{}[{k}][{j}]", step.layer_name));
            }
            if step.inputs.len() != 1 || Some(step.inputs[0]) != previous {
                chain = false;
            }
            previous = Some(step.node.id());
            if !seen.insert(step.layer.id) {
                continue;
            }
            let params: usize = step
                .layer
                .lock()
                .weights()
                .iter()
                .map(|w| w.var.elem_count())
                .sum();
            let connected: Vec<String> = match &step.node.0.op {
                NodeOp::Layer { inputs, .. } => inputs
                    .iter()
                    .map(|i| names_of.get(&i.id()).map_or("?", |s| s).to_string())
                    .collect(),
                NodeOp::Input { .. } | NodeOp::Output { .. } => Vec::new(),
            };
            // A layer of several outputs shows them all, as Keras: `[(None, 6), (None, 6)]`.
            let shown = match step.node.others() {
                [] => shape_text(step.node.shape()),
                others => {
                    let all: Vec<String> = std::iter::once(step.node.shape())
                        .chain(others.iter().map(|(_, s)| s.as_slice()))
                        .map(shape_text)
                        .collect();
                    format!("[{}]", all.join(", "))
                }
            };
            rows.push([
                format!(
                    "{} ({})",
                    step.layer_name,
                    class_name(step.layer.lock().kind())
                ),
                shown,
                grouped(params),
                connected.join(", "),
            ]);
        }
        let columns = if chain { 3 } else { 4 };
        let header = ["Layer (type)", "Output Shape", "Param #", "Connected to"];
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                rows.iter()
                    .map(|r| r[c].chars().count())
                    .chain([header[c].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |left: &str, mid: &str, right: &str, fill: &str| -> String {
            let parts: Vec<String> = widths.iter().map(|w| fill.repeat(w + 2)).collect();
            format!("{left}{}{right}\n", parts.join(mid))
        };
        let row = |cells: &[String], bar: &str| -> String {
            let parts: Vec<String> = cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| match c {
                    2 => format!(" {cell:>w$} "),
                    _ => format!(" {cell:<w$} "),
                })
                .collect();
            format!("{bar}{}{bar}\n", parts.join(bar))
        };
        let mut out = String::new();
        out.push_str(&line("┏", "┳", "┓", "━"));
        let head: Vec<String> = header[..columns].iter().map(|h| h.to_string()).collect();
        out.push_str(&row(&head, "┃"));
        out.push_str(&line("┡", "╇", "┩", "━"));
        for (i, r) in rows.iter().enumerate() {
            if i > 0 {
                out.push_str(&line("├", "┼", "┤", "─"));
            }
            out.push_str(&row(&r[..columns], "│"));
        }
        out.push_str(&line("└", "┴", "┘", "─"));
        let bytes = self.dtype.size_in_bytes();
        let count = |ws: Vec<crate::layers::Weight>| -> usize {
            ws.iter().map(|w| w.var.elem_count()).sum()
        };
        let (trainable, frozen) = (
            count(self.trainable_weights()),
            count(self.non_trainable_weights()),
        );
        for (what, n) in [
            ("Total", trainable + frozen),
            ("Trainable", trainable),
            ("Non-trainable", frozen),
        ] {
            let _ = writeln!(
                out,
                " {what} params: {} ({})",
                grouped(n),
                memory_text(n * bytes)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_and_numbers_read_as_in_keras() {
        assert_eq!(class_name("dense"), "Dense");
        assert_eq!(class_name("max_pooling2d"), "MaxPooling2D");
        assert_eq!(
            class_name("global_average_pooling1d"),
            "GlobalAveragePooling1D"
        );
        assert_eq!(class_name("batch_normalization"), "BatchNormalization");
        assert_eq!(class_name("lstm"), "LSTM");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(999), "999");
        assert_eq!(memory_text(196), "196.00 B");
        assert_eq!(memory_text(2048), "2.00 KB");
        assert_eq!(memory_text(5 * 1024 * 1024 + 512 * 1024), "5.50 MB");
        assert_eq!(shape_text(&[28, 28, 1]), "(None, 28, 28, 1)");
        assert_eq!(shape_text(&[]), "(None,)");
    }
}
