//! `Model::summary`: the layers, their output shapes and parameter counts, as Keras prints them.

use super::Model;
use crate::graph::SymbolicTensor;
use std::collections::{HashMap, HashSet};
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
    /// layer is connected to: every application's input tensors, as `<layer>[<node>][<tensor>]`),
    /// then the total, trainable and non-trainable parameter counts. A nested model is one row.
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
        let (rows, chain) = self.summary_rows();
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

/// One row of the summary: a layer, or a nested model, and every application of it.
struct Row {
    /// `name (Class)`.
    label: String,
    /// The output shapes of its last application made, as Keras shows a shared layer's.
    shape: String,
    params: usize,
    /// The tensors each application reads, by the application's node index.
    reads: Vec<(usize, Vec<usize>)>,
}

impl Model {
    /// The summary's rows (`[layer (type), output shape, params, connected to]`) and whether
    /// the graph is a plain chain, as Keras' `print_summary` decides it: one input, and each
    /// layer applied once, to one tensor, the previous layer's output.
    ///
    /// "Connected to" lists, as Keras does, every application's input tensors (explicit masks
    /// included), each as `<layer>[<node>][<tensor>]`: the node is the application's place
    /// among those of the same layer or nested model in this model, in the order they were
    /// made (Keras counts the layer's applications in every model), and the tensor its output
    /// index.
    fn summary_rows(&self) -> (Vec<[String; 4]>, bool) {
        // Every application in the graph: a layer's, or a nested model's as a whole.
        struct Applied {
            key: usize,
            created: usize,
            name: String,
            class: String,
            reads: Vec<usize>,
            outputs: Vec<(usize, Vec<usize>)>,
            params: usize,
        }
        let mut applied: Vec<Applied> = Vec::new();
        let mut applications = HashSet::new();
        for step in &self.steps {
            match step.node.0.within.first() {
                Some(app) => {
                    if !applications.insert(app.id) {
                        continue;
                    }
                    let name = self
                        .nesting
                        .models
                        .iter()
                        .find(|(_, s)| s.id == app.scope.id)
                        .map_or("?", |(n, _)| n.as_str());
                    let params = app
                        .scope
                        .layers
                        .iter()
                        .flat_map(|l| l.lock().weights())
                        .map(|w| w.var.elem_count())
                        .sum();
                    applied.push(Applied {
                        key: app.scope.id,
                        created: app.id,
                        name: name.to_string(),
                        class: "Functional".into(),
                        reads: app
                            .inputs
                            .iter()
                            .chain(app.masks.iter().flatten())
                            .map(SymbolicTensor::id)
                            .collect(),
                        outputs: app
                            .output_ids()
                            .into_iter()
                            .zip(&app.scope.outputs)
                            .map(|(id, o)| (id, o.shape().to_vec()))
                            .collect(),
                        params,
                    });
                }
                None => {
                    let layer = step.layer.lock();
                    applied.push(Applied {
                        key: step.layer.id,
                        created: step.node.id(),
                        name: step.layer_name.clone(),
                        class: class_name(layer.kind()),
                        reads: step
                            .inputs
                            .iter()
                            .copied()
                            .chain(step.masks.iter().flatten().copied())
                            .collect(),
                        // A layer of several outputs (an LSTM's states) shows them all.
                        outputs: std::iter::once((step.node.id(), step.node.shape().to_vec()))
                            .chain(step.node.others().iter().cloned())
                            .collect(),
                        params: layer.weights().iter().map(|w| w.var.elem_count()).sum(),
                    });
                }
            }
        }
        // Each application's node index: its place among its layer's, by creation.
        let mut created_of: HashMap<usize, Vec<usize>> = HashMap::new();
        for a in &applied {
            created_of.entry(a.key).or_default().push(a.created);
        }
        for list in created_of.values_mut() {
            list.sort_unstable();
        }
        let node_of = |a: &Applied| created_of[&a.key].binary_search(&a.created).unwrap_or(0);
        let mut history: HashMap<usize, String> = HashMap::new();
        for (sym, name) in self.inputs.iter().zip(&self.input_names) {
            history.insert(sym.id(), format!("{name}[0][0]"));
        }
        for a in &applied {
            let node = node_of(a);
            for (j, (id, _)) in a.outputs.iter().enumerate() {
                history.insert(*id, format!("{}[{node}][{j}]", a.name));
            }
        }

        let mut chain = self.inputs.len() == 1;
        let mut previous = self.inputs.first().map(SymbolicTensor::id);
        let mut rows: Vec<Row> = Vec::new();
        let mut row_of: HashMap<usize, usize> = HashMap::new();
        for a in &applied {
            if a.reads.len() != 1 || Some(a.reads[0]) != previous || row_of.contains_key(&a.key) {
                chain = false;
            }
            previous = a.outputs.first().map(|(id, _)| *id);
            let shapes: Vec<String> = a.outputs.iter().map(|(_, s)| shape_text(s)).collect();
            let shape = match shapes.as_slice() {
                [one] => one.clone(),
                many => format!("[{}]", many.join(", ")),
            };
            let reads = (node_of(a), a.reads.clone());
            match row_of.get(&a.key) {
                Some(&r) => {
                    if rows[r].reads.iter().all(|(node, _)| *node < reads.0) {
                        rows[r].shape = shape;
                    }
                    rows[r].reads.push(reads);
                }
                None => {
                    row_of.insert(a.key, rows.len());
                    rows.push(Row {
                        label: format!("{} ({})", a.name, a.class),
                        shape,
                        params: a.params,
                        reads: vec![reads],
                    });
                }
            }
        }
        let inputs = self
            .inputs
            .iter()
            .zip(&self.input_names)
            .map(|(sym, name)| {
                [
                    format!("{name} (InputLayer)"),
                    shape_text(sym.shape()),
                    "0".into(),
                    "-".into(),
                ]
            });
        let layers = rows.into_iter().map(|mut r| {
            // Keras lists the nodes in the order they were made.
            r.reads.sort_by_key(|(node, _)| *node);
            let connected: Vec<&str> = r
                .reads
                .iter()
                .flat_map(|(_, ids)| ids)
                .map(|id| history.get(id).map_or("?", String::as_str))
                .collect();
            [
                r.label,
                r.shape,
                grouped(r.params),
                if connected.is_empty() {
                    "-".into()
                } else {
                    connected.join(", ")
                },
            ]
        });
        (inputs.chain(layers).collect(), chain)
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
