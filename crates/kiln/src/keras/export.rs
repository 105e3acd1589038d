//! Writing a `.keras` file: the architecture an imported model came with, and its current
//! weights at the places Keras reads them from.

use super::h5::Tree;
use crate::error::{Error, Result};
use crate::model::Model;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// Writes `model` to `path` (whole or not at all).
pub(crate) fn save(model: &Model, path: &Path) -> Result<()> {
    let Some(source) = model.keras.as_ref() else {
        return save_native(model, path);
    };
    let mut tree = Tree::default();
    for slot in &source.slots {
        let group = tree.group(&slot.vars);
        group.set_name(slot.kiln.rsplit('/').next().unwrap_or(&slot.kiln));
        for (i, w) in slot.weights.iter().enumerate() {
            let weight = model.weight(&format!("{}/{w}", slot.kiln))?;
            let t = weight.var.as_tensor();
            let values = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            group.dataset(&i.to_string(), t.dims().to_vec(), values);
        }
    }
    let weights = tree.to_bytes()?;
    let config = serde_json::to_vec(&source.config)
        .map_err(|e| Error::Data(format!("{}: cannot write config.json: {e}", path.display())))?;
    let metadata = serde_json::json!({
        "keras_version": "3.15.1",
        "exported_by": concat!("kiln ", env!("CARGO_PKG_VERSION")),
    });
    super::archive::write(path, &config, metadata.to_string().as_bytes(), &weights)
}

fn keras_tensor(shape: &[usize], history: (&str, usize)) -> Value {
    let mut s = vec![Value::Null];
    s.extend(shape.iter().map(|&d| Value::from(d)));
    json!({
        "class_name": "__keras_tensor__",
        "config": { "shape": s, "dtype": "float32", "keras_history": [history.0, history.1, 0] }
    })
}

fn batch_shape(shape: &[usize]) -> Value {
    let mut s = vec![Value::Null];
    s.extend(shape.iter().map(|&d| Value::from(d)));
    Value::Array(s)
}

/// A model built in kiln: a Functional config written from its graph, layer by layer.
fn save_native(model: &Model, path: &Path) -> Result<()> {
    let view = model.graph_view();
    let shown = path.display();
    // Which tensor is which Keras output: (layer, node index); and every tensor's shape.
    let mut made_by: HashMap<usize, (String, usize)> = HashMap::new();
    let mut shapes: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut layers = Vec::new();
    let mut groups: HashMap<&'static str, usize> = HashMap::new();
    let mut group_name = |snake: &'static str| match groups.get_mut(snake) {
        Some(n) => {
            *n += 1;
            format!("{snake}_{n}")
        }
        None => {
            groups.insert(snake, 0);
            snake.to_string()
        }
    };
    let mut tree = Tree::default();
    for (name, id, shape) in &view.inputs {
        made_by.insert(*id, (name.clone(), 0));
        shapes.insert(*id, shape.clone());
        layers.push(json!({
            "module": "keras.layers", "class_name": "InputLayer",
            "config": { "batch_shape": batch_shape(shape), "dtype": "float32", "sparse": false,
                        "ragged": false, "name": name },
            "registered_name": null, "name": name, "inbound_nodes": [],
        }));
        group_name("input_layer");
    }
    // Layers in order of first application, each with all its nodes.
    let mut order: Vec<String> = Vec::new();
    let mut nodes: HashMap<String, Vec<Value>> = HashMap::new();
    let mut first: HashMap<String, (&crate::model::StepView, Vec<usize>)> = HashMap::new();
    for step in &view.steps {
        let args: Vec<Value> = step
            .inputs
            .iter()
            .map(|i| {
                let (l, k) = made_by[i].clone();
                keras_tensor(&shapes[i], (&l, k))
            })
            .collect();
        let entry = nodes.entry(step.layer_name.clone()).or_default();
        let k = entry.len();
        let arg = if args.len() == 1 {
            args[0].clone()
        } else {
            Value::Array(args)
        };
        entry.push(json!({ "args": [arg], "kwargs": {} }));
        made_by.insert(step.output, (step.layer_name.clone(), k));
        shapes.insert(step.output, step.shape.clone());
        if k == 0 {
            order.push(step.layer_name.clone());
            first.insert(
                step.layer_name.clone(),
                (step, shapes[&step.inputs[0]].clone()),
            );
        }
    }
    for name in &order {
        let (step, input_shape) = &first[name];
        let layer = step.layer.lock();
        let described = layer.keras_config();
        let kind = layer.kind();
        // Unlocked before the weights are read: reading them locks every layer.
        drop(layer);
        let (class, mut config) = described.ok_or_else(|| {
            Error::Data(format!(
                "{shown}: layer `{name}` ({}) cannot be written as Keras yet: save_keras writes \
                 models imported from Keras, and kiln-built models of Dense, Activation, Dropout \
                 and Flatten layers with L1/L2 regularizers",
                kind
            ))
        })?;
        config["name"] = name.clone().into();
        config["trainable"] = true.into();
        config["dtype"] = "float32".into();
        let snake = super::layers::snake_name(class).unwrap_or("layer");
        let group = format!("layers/{}/vars", group_name(snake));
        let vars = tree.group(&group);
        vars.set_name(name);
        let keras_order: &[&str] = match class {
            "Dense" => &["kernel", "bias"],
            _ => &[],
        };
        let mut i = 0;
        for w in keras_order {
            if let Ok(weight) = model.weight(&format!("{name}/{w}")) {
                let t = weight.var.as_tensor();
                let values = t
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?;
                vars.dataset(&i.to_string(), t.dims().to_vec(), values);
                i += 1;
            }
        }
        layers.push(json!({
            "module": "keras.layers", "class_name": class, "config": config,
            "registered_name": null, "name": name,
            "build_config": { "input_shape": batch_shape(input_shape) },
            "inbound_nodes": nodes.remove(name).unwrap_or_default(),
        }));
    }
    let ends = |ids: Vec<usize>| -> Vec<Value> {
        ids.iter()
            .map(|i| {
                let (l, k) = made_by[i].clone();
                json!([l, k, 0])
            })
            .collect()
    };
    let inputs = ends(view.inputs.iter().map(|(_, id, _)| *id).collect());
    let outputs = ends(view.outputs.clone());
    let config = json!({
        "module": "keras.src.models.functional", "class_name": "Functional",
        "config": { "name": "kiln_model", "trainable": true, "layers": layers,
                    "input_layers": inputs, "output_layers": outputs },
        "registered_name": "Functional",
    });
    let weights = tree.to_bytes()?;
    let config = serde_json::to_vec(&config)
        .map_err(|e| Error::Data(format!("{shown}: cannot write config.json: {e}")))?;
    let metadata = json!({
        "keras_version": "3.15.1",
        "exported_by": concat!("kiln ", env!("CARGO_PKG_VERSION")),
    });
    super::archive::write(path, &config, metadata.to_string().as_bytes(), &weights)
}
