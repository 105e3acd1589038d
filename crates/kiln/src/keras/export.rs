//! Writing a `.keras` file: the architecture an imported model came with, and its current
//! weights at the places Keras reads them from.

use super::graph::GroupNames;
use super::h5::Tree;
use crate::error::{Error, Result};
use crate::layers::Weight;
use crate::model::Model;
use crate::model::{GraphView, StepOp, StepView};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The compile configuration to write, given the Keras output names and the file's name.
type CompileConfigOf<'a> = dyn Fn(&[String], &str) -> Result<Option<Value>> + 'a;

/// Writes `model` to `path` (whole or not at all), with its compile configuration when
/// `compile` is true and the model is compiled.
pub(crate) fn save(model: &Model, path: &Path, compile: bool) -> Result<()> {
    let compiled = |outputs: &[String], shown: &str| match compile {
        true => super::compile_out::compile_config(model, outputs, shown),
        false => Ok(None),
    };
    let Some(source) = model.keras.as_ref() else {
        return save_native(model, path, &compiled);
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
    // A compiled model writes the compile configuration it has now (it may have been compiled
    // again since the import); an uncompiled one keeps the file's.
    let keras_outputs: Vec<String> = source.outputs.iter().map(|(k, _)| k.clone()).collect();
    let shown = path.display().to_string();
    let mut config = source.config.clone();
    if let Some(cc) = compiled(&keras_outputs, &shown)? {
        config["compile_config"] = cc;
    }
    let config = serde_json::to_vec(&config)
        .map_err(|e| Error::Data(format!("{shown}: cannot write config.json: {e}")))?;
    let metadata = serde_json::json!({
        "keras_version": "3.15.1",
        "exported_by": concat!("kiln ", env!("CARGO_PKG_VERSION")),
    });
    super::archive::write(path, &config, metadata.to_string().as_bytes(), &weights)
}

/// Which Keras node makes a tensor: `(layer, node index, output index)`, Keras' `keras_history`.
type History = (String, usize, usize);

fn keras_tensor(shape: &[usize], history: &History) -> Value {
    let mut s = vec![Value::Null];
    s.extend(shape.iter().map(|&d| Value::from(d)));
    json!({
        "class_name": "__keras_tensor__",
        "config": { "shape": s, "dtype": "float32",
                    "keras_history": [history.0, history.1, history.2] }
    })
}

fn batch_shape(shape: &[usize]) -> Value {
    let mut s = vec![Value::Null];
    s.extend(shape.iter().map(|&d| Value::from(d)));
    Value::Array(s)
}

/// The layers of a kiln graph in the order Keras' `map_graph` lists a Functional model's
/// operations once it is loaded: by depth from the outputs (deepest first), ties broken by the
/// order a depth-first walk from the outputs first meets them. Keras names each layer's group in
/// the weights file by its place in that list (`dense`, `dense_1`, …), so the config must list
/// the layers in the same order for the weights to land where Keras reads them.
fn keras_operation_order(view: &GraphView) -> Vec<String> {
    // Nodes: the inputs (`Input(i)`) and the steps (`Step(s)`), each of one operation.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    enum N {
        Input(usize),
        Step(usize),
    }
    let mut maker: HashMap<usize, N> = HashMap::new();
    for (i, (_, id, _)) in view.inputs.iter().enumerate() {
        maker.insert(*id, N::Input(i));
    }
    for (s, step) in view.steps.iter().enumerate() {
        for (id, _) in &step.outputs {
            maker.insert(*id, N::Step(s));
        }
    }
    let op = |n: N| match n {
        N::Input(i) => view.inputs[i].0.clone(),
        N::Step(s) => view.steps[s].layer_name.clone(),
    };
    let parents = |n: N| -> Vec<N> {
        match n {
            N::Input(_) => Vec::new(),
            N::Step(s) => view.steps[s].inputs.iter().map(|t| maker[t]).collect(),
        }
    };
    // Depth-first from each output: post-order of nodes, pre-order index of operations.
    let mut finished = std::collections::HashSet::new();
    let mut post: Vec<N> = Vec::new();
    let mut index: HashMap<String, i64> = HashMap::new();
    fn walk(
        n: N,
        parents: &dyn Fn(N) -> Vec<N>,
        op: &dyn Fn(N) -> String,
        finished: &mut std::collections::HashSet<N>,
        post: &mut Vec<N>,
        index: &mut HashMap<String, i64>,
    ) {
        if finished.contains(&n) {
            return;
        }
        let len = index.len() as i64;
        index.entry(op(n)).or_insert(len);
        for p in parents(n) {
            walk(p, parents, op, finished, post, index);
        }
        finished.insert(n);
        post.push(n);
    }
    for t in &view.outputs {
        walk(
            maker[t],
            &parents,
            &op,
            &mut finished,
            &mut post,
            &mut index,
        );
    }
    let mut node_depth: HashMap<N, usize> = HashMap::new();
    let mut op_depth: HashMap<String, usize> = HashMap::new();
    for &n in post.iter().rev() {
        let d = *node_depth.entry(n).or_insert(0);
        let d = d.max(op_depth.get(&op(n)).copied().unwrap_or(0));
        op_depth.insert(op(n), d);
        node_depth.insert(n, d);
        for p in parents(n) {
            let e = node_depth.entry(p).or_insert(0);
            *e = (*e).max(d + 1);
        }
    }
    // Inputs that no output depends on come at depth 0, first among equals.
    for (name, _, _) in &view.inputs {
        if !op_depth.contains_key(name) {
            op_depth.insert(name.clone(), 0);
            index.insert(name.clone(), -1);
        }
    }
    let mut ops: Vec<String> = op_depth.keys().cloned().collect();
    ops.sort_by_key(|o| (std::cmp::Reverse(op_depth[o]), index[o]));
    ops
}

/// A layer's weights in the order Keras stores them, each with its name after `<layer>/`.
pub(crate) type KerasWeights = Vec<(&'static str, Weight)>;

/// Where Keras keeps the weights of a kiln-built model's layers: for each layer (in the order
/// Keras lists a Functional model's operations) its name, its group in the weights file
/// (`layers/dense_1/vars`, `layers/lstm/cell/vars`) and its weights in the order Keras stores
/// them (`vars/0`, `vars/1`, …). `shown` names the file, for messages.
pub(crate) fn weight_groups(
    model: &Model,
    shown: &str,
) -> Result<Vec<(String, String, KerasWeights)>> {
    let view = model.graph_view();
    let inputs: Vec<&String> = view.inputs.iter().map(|(n, _, _)| n).collect();
    let mut groups = GroupNames::default();
    let mut out = Vec::new();
    for name in keras_operation_order(view) {
        if inputs.contains(&&name) {
            groups.next("input_layer");
            continue;
        }
        let step = view
            .steps
            .iter()
            .find(|s| s.layer_name == name)
            .ok_or_else(|| Error::Data(format!("{shown}: layer `{name}` is not in the graph")))?;
        let layer = match &step.op {
            StepOp::Layer(layer) => layer.lock(),
            StepOp::Nested(_) => {
                return Err(Error::Data(format!(
                    "{shown}: `{name}` is a model nested in this one; Keras weights files are \
                     read onto models without nested models so far (build it flat, or save the \
                     whole model as .keras and import it)"
                )))
            }
        };
        let described = layer.keras_config();
        let kind = layer.kind();
        let weights = layer.weights();
        drop(layer);
        let (class, _) = described.ok_or_else(|| {
            Error::Data(format!(
                "{shown}: layer `{name}` ({kind}) cannot be written as Keras: Keras has no layer \
                 with its configuration (a layer of your own, a custom regularizer, or an option \
                 Keras lacks such as causal pooling); nothing was written"
            ))
        })?;
        let snake = super::layers::snake_name(class).unwrap_or("layer");
        let (order, in_cell) = super::layers::keras_weights(class);
        let group = groups.next(snake);
        let path = if in_cell {
            format!("layers/{group}/cell/vars")
        } else {
            format!("layers/{group}/vars")
        };
        let ordered: KerasWeights = order
            .iter()
            .filter_map(|w| {
                weights
                    .iter()
                    .find(|x| x.name.rsplit('/').next() == Some(*w))
                    .map(|x| (*w, x.clone()))
            })
            .collect();
        if ordered.len() != weights.len() {
            return Err(Error::Data(format!(
                "{shown}: layer `{name}` ({class}) has weights {:?}, of which Keras' {class} \
                 stores only {order:?}; nothing was written",
                weights.iter().map(|w| w.name.as_str()).collect::<Vec<_>>()
            )));
        }
        out.push((name, path, ordered));
    }
    Ok(out)
}

/// A model built in kiln: a Functional config written from its graph, layer by layer, and the
/// weights where Keras reads them.
fn save_native(model: &Model, path: &Path, compiled: &CompileConfigOf) -> Result<()> {
    let shown = path.display().to_string();
    let mut tree = Tree::default();
    let name = model.name().unwrap_or("kiln_model");
    let mut config = functional(model.graph_view(), name, true, "", &mut tree, &shown)?;
    // The Keras output names: the layers that make the outputs.
    let keras_outputs: Vec<String> = config["config"]["output_layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|end| end[0].as_str().map(str::to_string))
        .collect();
    if let Some(cc) = compiled(&keras_outputs, &shown)? {
        config["compile_config"] = cc;
    }
    let weights = tree.to_bytes()?;
    let config = serde_json::to_vec(&config)
        .map_err(|e| Error::Data(format!("{shown}: cannot write config.json: {e}")))?;
    let metadata = json!({
        "keras_version": "3.15.1",
        "exported_by": concat!("kiln ", env!("CARGO_PKG_VERSION")),
    });
    super::archive::write(path, &config, metadata.to_string().as_bytes(), &weights)
}

/// The Keras `Functional` object of one graph (the whole model, or a model nested in it, as
/// Keras 3 writes a Functional inside a Functional), its weights written into `tree` under
/// `h5` (`""`, or `layers/functional/` for a nested one).
fn functional(
    view: &GraphView,
    name: &str,
    trainable: bool,
    h5: &str,
    tree: &mut Tree,
    shown: &str,
) -> Result<Value> {
    // Which tensor is which Keras output; and every tensor's shape.
    let mut made_by: HashMap<usize, History> = HashMap::new();
    let mut shapes: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut input_layers: HashMap<String, Value> = HashMap::new();
    for (name, id, shape) in &view.inputs {
        made_by.insert(*id, (name.clone(), 0, 0));
        shapes.insert(*id, shape.clone());
        input_layers.insert(
            name.clone(),
            json!({
                "module": "keras.layers", "class_name": "InputLayer",
                "config": { "batch_shape": batch_shape(shape), "dtype": "float32", "sparse": false,
                            "ragged": false, "name": name },
                "registered_name": null, "name": name, "inbound_nodes": [],
            }),
        );
    }
    // Every layer with all its nodes, in the order kiln applies them.
    let mut nodes: HashMap<String, Vec<Value>> = HashMap::new();
    let mut first: HashMap<String, &StepView> = HashMap::new();
    let mut build_shapes: HashMap<String, Value> = HashMap::new();
    for step in &view.steps {
        let args: Vec<Value> = step
            .inputs
            .iter()
            .map(|i| keras_tensor(&shapes[i], &made_by[i]))
            .collect();
        let entry = nodes.entry(step.layer_name.clone()).or_default();
        let k = entry.len();
        // A recurrent layer's inputs after the sequence are its initial states, which Keras
        // passes as the `initial_state` keyword.
        let recurrent = match &step.op {
            StepOp::Layer(l) => matches!(
                l.lock().keras_config().map(|(class, _)| class),
                Some("LSTM" | "GRU")
            ),
            StepOp::Nested(_) => false,
        };
        let (args, initial) = match recurrent && args.len() > 1 {
            true => (args[..1].to_vec(), Some(Value::Array(args[1..].to_vec()))),
            false => (args, None),
        };
        let arg = if args.len() == 1 {
            args[0].clone()
        } else {
            Value::Array(args)
        };
        // Keras calls a nested model with its `mask` argument, and writes it.
        let kwargs = match (&step.op, initial) {
            (StepOp::Layer(_), None) => json!({}),
            (StepOp::Layer(_), Some(states)) => json!({ "initial_state": states }),
            (StepOp::Nested(_), _) => json!({ "mask": null }),
        };
        entry.push(json!({ "args": [arg], "kwargs": kwargs }));
        for (j, (id, shape)) in step.outputs.iter().enumerate() {
            made_by.insert(*id, (step.layer_name.clone(), k, j));
            shapes.insert(*id, shape.clone());
        }
        if k == 0 {
            let input_shape = match step.inputs.as_slice() {
                [one] => json!({ "input_shape": batch_shape(&shapes[one]) }),
                // Keras builds a recurrent layer given initial states from both shapes.
                [sequence, states @ ..] if recurrent => json!({ "shapes_dict": {
                    "sequences_shape": batch_shape(&shapes[sequence]),
                    "initial_state_shape":
                        states.iter().map(|i| batch_shape(&shapes[i])).collect::<Vec<_>>(),
                }}),
                many => json!({ "input_shape":
                    many.iter().map(|i| batch_shape(&shapes[i])).collect::<Vec<_>>() }),
            };
            first.insert(step.layer_name.clone(), step);
            build_shapes.insert(step.layer_name.clone(), input_shape);
        }
    }
    let mut groups = GroupNames::default();
    let mut layers = Vec::new();
    for name in keras_operation_order(view) {
        if let Some(input) = input_layers.remove(&name) {
            groups.next("input_layer");
            layers.push(input);
            continue;
        }
        let step = first[&name];
        let layer = match &step.op {
            StepOp::Layer(layer) => layer,
            StepOp::Nested(scope) => {
                let group = groups.next("functional");
                let trainable = scope.layers.iter().all(|l| l.is_trainable());
                let inner = format!("{h5}layers/{group}/");
                tree.group(&format!("{inner}vars")).set_name(&name);
                let mut nested = functional(&scope.view, &name, trainable, &inner, tree, shown)?;
                nested["name"] = name.clone().into();
                nested["build_config"] = json!({ "input_shape": null });
                nested["inbound_nodes"] = nodes.remove(&name).unwrap_or_default().into();
                layers.push(nested);
                continue;
            }
        };
        let guard = layer.lock();
        let described = guard.keras_config();
        let kind = guard.kind();
        let weights = guard.weights();
        drop(guard);
        let (class, mut config) = described.ok_or_else(|| {
            Error::Data(format!(
                "{shown}: layer `{name}` ({kind}) cannot be written as Keras: Keras has no layer \
                 with its configuration (a layer of your own, a custom regularizer, or an option \
                 Keras lacks such as causal pooling); nothing was written"
            ))
        })?;
        config["name"] = name.clone().into();
        config["trainable"] = layer.is_trainable().into();
        config["dtype"] = "float32".into();
        let snake = super::layers::snake_name(class).unwrap_or("layer");
        let (order, in_cell) = super::layers::keras_weights(class);
        let group = groups.next(snake);
        let vars = tree.group(&if in_cell {
            format!("{h5}layers/{group}/cell/vars")
        } else {
            format!("{h5}layers/{group}/vars")
        });
        vars.set_name(&name);
        let mut written = 0;
        for (i, w) in order
            .iter()
            .filter_map(|w| {
                weights
                    .iter()
                    .find(|x| x.name.rsplit('/').next() == Some(*w))
            })
            .enumerate()
        {
            let t = w.var.as_tensor();
            let values = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            vars.dataset(&i.to_string(), t.dims().to_vec(), values);
            written += 1;
        }
        if written != weights.len() {
            return Err(Error::Data(format!(
                "{shown}: layer `{name}` ({class}) has weights {:?}, of which Keras' {class} \
                 stores only {order:?}; nothing was written",
                weights.iter().map(|w| w.name.as_str()).collect::<Vec<_>>()
            )));
        }
        layers.push(json!({
            "module": "keras.layers", "class_name": class, "config": config,
            "registered_name": null, "name": name,
            "build_config": build_shapes[&name],
            "inbound_nodes": nodes.remove(&name).unwrap_or_default(),
        }));
    }
    let ends = |ids: Vec<usize>| -> Vec<Value> {
        ids.iter()
            .map(|i| {
                let (l, k, j) = made_by[i].clone();
                json!([l, k, j])
            })
            .collect()
    };
    let inputs = ends(view.inputs.iter().map(|(_, id, _)| *id).collect());
    let outputs = ends(view.outputs.clone());
    Ok(json!({
        "module": "keras.src.models.functional", "class_name": "Functional",
        "config": { "name": name, "trainable": trainable, "layers": layers,
                    "input_layers": inputs, "output_layers": outputs },
        "registered_name": "Functional",
    }))
}
