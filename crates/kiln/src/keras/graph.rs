//! Keras' model configs (Functional and Sequential, nested in each other) to kiln's functional
//! graph: every layer made once and applied at each of its nodes, so shared layers and nested
//! models applied twice share their weights; a nested model becomes a kiln model applied as a
//! layer, whose layers the outer model names with its name (`encoder/dense`).

use super::json::{error_at, short, Obj};
use super::layers::{self, Made};
use crate::error::Result;
use crate::graph::{Input, SharedLayer, SymbolicTensor};
use crate::layers::{LayerExt, LogicalOr, NotEqual, ReduceAny};
use serde_json::Value;
use std::collections::HashMap;
use std::rc::Rc;

/// Where a kiln layer's weights sit in the weights file.
pub(crate) struct LayerSlot {
    /// The kiln layer name (`encoder/dense`).
    pub(crate) kiln: String,
    /// The group of its variables (`layers/functional/layers/dense/vars`).
    pub(crate) vars: String,
    /// kiln's weight names after `<layer>/`, in the order of `vars/0`, `vars/1`, ….
    pub(crate) weights: Vec<&'static str>,
}

/// A tensor of a Keras graph: `(layer, node, output)` as in `keras_history`.
type Ref = (String, usize, usize);

/// What a Keras layer of a model became.
enum Built {
    /// An `InputLayer`: its tensor is given.
    Input,
    /// A kiln layer.
    Layer(SharedLayer),
    /// A nested model: a kiln [`crate::Model`] applied as a layer ([`Graph::as_model`]).
    Nested(Rc<Graph>),
    /// A mask op under its kiln layer name: a mask for an explicit `mask=` argument (an
    /// `Embedding(mask_zero=True)`'s mask is one), made a kiln [`NotEqual`] or [`ReduceAny`]
    /// layer. Used as data it is refused.
    Mask(String, MaskOp),
}

/// The ops Keras writes into a config to compute the masks it passes between layers.
#[derive(Clone, Copy)]
enum MaskOp {
    /// `keras.ops.not_equal(x, value)`: an Embedding's `mask_zero` mask, or a user's.
    NotEqual,
    /// `keras.ops.any(mask, axis, keepdims)`: with `NotEqual`, a Masking layer's mask.
    Any { axis: isize, keepdims: bool },
    /// `keras.ops.logical_or(a, b)`: the mask of an Add or Multiply of masked tensors.
    Or,
}

/// One argument tensor of a node, with the shape Keras recorded for it.
struct Arg {
    r: Ref,
    /// `None` in a legacy `.h5` file's Keras 2 nodes, which record no shapes: kiln's shape is
    /// written into the config once the graph is built.
    shape: Option<Vec<Option<usize>>>,
    path: String,
}

struct Node {
    /// The tensors the layer reads, in kiln's order: the call's arguments, then the tensors of
    /// an `initial_state` keyword (a recurrent layer's initial states).
    args: Vec<Arg>,
    /// How many of `args` came from `initial_state`, at the place of `initial_path`.
    initial: usize,
    initial_path: String,
    /// The masks Keras passes explicitly (`mask=` in the call), one per input (`None`: that
    /// input's own); empty when the call has none.
    mask: Vec<Option<Arg>>,
    /// The value a `NotEqual` node compares with.
    not_equal: Option<f64>,
    path: String,
}

struct Entry {
    name: String,
    built: Built,
    nodes: Vec<Node>,
}

/// A Keras model, its layers made, ready to be applied to kiln tensors.
pub(crate) struct Graph {
    name: String,
    entries: Vec<Entry>,
    /// Functional: the input and output tensors; Sequential: empty (a chain).
    inputs: Vec<Ref>,
    outputs: Vec<Ref>,
    /// The model's inputs: name and sample shape.
    pub(crate) input_specs: Vec<(String, Vec<usize>)>,
    sequential: bool,
    path: String,
    /// The shapes kiln computed for arguments that had none (a legacy file's nodes): the JSON
    /// path of each argument and its sample shape.
    filled: std::cell::RefCell<Vec<(String, Vec<usize>)>>,
    /// The graph as a kiln model, once a model it is nested in applies it.
    model: std::cell::OnceCell<crate::Model>,
}

/// What reading a config gathers besides the graph.
pub(crate) struct Reader<'a> {
    pub(crate) file: &'a str,
    pub(crate) slots: Vec<LayerSlot>,
    /// A config translated from a legacy `.h5` file: its tensors may have no recorded shape.
    pub(crate) legacy: bool,
}

/// Keras' unique names for the groups of a container's members: `dense`, `dense_1`, ….
#[derive(Default)]
pub(crate) struct GroupNames(HashMap<&'static str, usize>);

impl GroupNames {
    pub(crate) fn next(&mut self, snake: &'static str) -> String {
        match self.0.get_mut(snake) {
            Some(n) => {
                *n += 1;
                format!("{snake}_{n}")
            }
            None => {
                self.0.insert(snake, 0);
                snake.to_string()
            }
        }
    }
}

/// A sample shape from a Keras shape with the batch axis first: every other axis fixed.
fn sample_shape(file: &str, path: &str, v: &Value) -> Result<Vec<usize>> {
    let items = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| error_at(file, path, format!("expected a shape, got {}", short(v))))?;
    items[1..]
        .iter()
        .map(|d| {
            d.as_u64()
                .filter(|d| *d > 0)
                .map(|d| d as usize)
                .ok_or_else(|| {
                    error_at(
                        file,
                        path,
                        format!(
                            "shape {} has an axis of unknown size: kiln needs every axis but the \
                         batch fixed",
                            short(v)
                        ),
                    )
                })
        })
        .collect()
}

fn keras_shape(v: &Value) -> Option<Vec<Option<usize>>> {
    v.as_array()?
        .iter()
        .map(|d| match d {
            Value::Null => Some(None),
            d => d.as_u64().map(|d| Some(d as usize)),
        })
        .collect()
}

/// A `__keras_tensor__` argument.
fn tensor_arg(file: &str, path: String, v: &Value, legacy: bool) -> Result<Arg> {
    let t = Obj::new(v, path.clone(), file)?;
    if t.str("class_name")? != "__keras_tensor__" {
        return Err(t.error("class_name", "expected a Keras tensor"));
    }
    let c = t.obj("config")?;
    let shape = match c.get("shape") {
        None if legacy => None,
        _ => Some(
            keras_shape(c.required("shape")?)
                .ok_or_else(|| c.error("shape", "expected a shape"))?,
        ),
    };
    c.ignore(&["dtype"]);
    let h = c.required("keras_history")?;
    let r = match h.as_array().map(Vec::as_slice) {
        Some([Value::String(n), a, b]) if a.is_u64() && b.is_u64() => (
            n.clone(),
            a.as_u64().unwrap_or(0) as usize,
            b.as_u64().unwrap_or(0) as usize,
        ),
        _ => {
            return Err(c.error(
                "keras_history",
                format!("expected [layer, node, index], got {}", short(h)),
            ))
        }
    };
    c.finish("a Keras tensor")?;
    t.finish("a Keras tensor")?;
    Ok(Arg { r, shape, path })
}

/// `[name, node, index]` or a list of them (`input_layers`, `output_layers`).
fn refs(o: &Obj, key: &str) -> Result<Vec<Ref>> {
    let v = o.required(key)?;
    let one = |v: &Value| match v.as_array().map(Vec::as_slice) {
        Some([Value::String(n), a, b]) if a.is_u64() && b.is_u64() => Some((
            n.clone(),
            a.as_u64().unwrap_or(0) as usize,
            b.as_u64().unwrap_or(0) as usize,
        )),
        _ => None,
    };
    if let Some(r) = one(v) {
        return Ok(vec![r]);
    }
    v.as_array()
        .and_then(|a| a.iter().map(one).collect::<Option<Vec<_>>>())
        .ok_or_else(|| {
            o.error(
                key,
                format!(
                    "expected [layer, node, index] or a list of them, got {}",
                    short(v)
                ),
            )
        })
}

impl<'a> Reader<'a> {
    /// Reads a model object (`{"class_name": "Functional", "config": {…}}`) at `path`, its
    /// layers named with `prefix`, its weights under the group `h5`.
    pub(crate) fn model(&mut self, o: &Obj, prefix: &str, h5: &str) -> Result<Rc<Graph>> {
        let class = o.str("class_name")?;
        o.ignore(&[
            "module",
            "build_config",
            "compile_config",
            "name",
            "inbound_nodes",
        ]);
        o.expect(
            "registered_name",
            |v| v.is_null() || v.as_str() == Some(class),
            "built-in model classes",
        )?;
        let cfg = o.obj("config")?;
        let graph = match class {
            "Functional" | "Model" => self.functional(&cfg, prefix, h5)?,
            "Sequential" => self.sequential(&cfg, prefix, h5)?,
            other => {
                return Err(o.error(
                    "class_name",
                    format!("`{other}` is not a Functional or Sequential model: subclassed models carry their code, which kiln never runs"),
                ))
            }
        };
        o.finish("a model")?;
        Ok(Rc::new(graph))
    }

    /// One member of a model's layer list: returns its name, what it became, and its config
    /// object (for the nodes).
    fn member(
        &mut self,
        l: &Obj,
        prefix: &str,
        h5: &str,
        groups: &mut GroupNames,
    ) -> Result<(String, Built)> {
        let class = l.str("class_name")?;
        let cfg = l.obj("config")?;
        let name = match l.get("name") {
            Some(n) => n
                .as_str()
                .ok_or_else(|| l.error("name", "expected a string"))?
                .to_string(),
            None => cfg.str("name")?.to_string(),
        };
        let registered = l.get("registered_name").filter(|v| !v.is_null());
        if let Some(r) = registered {
            if r.as_str() != Some(class) {
                return Err(l.error(
                    "registered_name",
                    format!("layer `{name}` is the custom class {}: kiln never runs code from a file; rebuild it in Rust", short(r)),
                ));
            }
        }
        l.ignore(&["module"]);
        if class == "Lambda" {
            return Err(l.error(
                "class_name",
                format!("layer `{name}` is a Lambda layer, which holds Python code: kiln never runs code from a file; rebuild it from built-in layers"),
            ));
        }
        if matches!(class, "Functional" | "Sequential" | "Model") {
            let snake = if class == "Sequential" {
                "sequential"
            } else {
                "functional"
            };
            let group = format!("{h5}/{}", groups.next(snake));
            let nested = self.model(l, &format!("{prefix}{name}/"), &format!("{group}/layers"))?;
            self.slots.push(LayerSlot {
                kiln: format!("{prefix}{name}"),
                vars: format!("{group}/vars"),
                weights: Vec::new(),
            });
            return Ok((name, Built::Nested(nested)));
        }
        if class == "InputLayer" {
            let group = groups.next("input_layer");
            self.slots.push(LayerSlot {
                kiln: format!("{prefix}{name}"),
                vars: format!("{h5}/{group}/vars"),
                weights: Vec::new(),
            });
            return Ok((name, Built::Input));
        }
        if class == "NotEqual" {
            // An op, not a layer: no group in the weights file. Checked where it is used.
            cfg.ignore(&["name"]);
            cfg.finish("NotEqual")?;
            return Ok((name.clone(), Built::Mask(name.clone(), MaskOp::NotEqual)));
        }
        if class == "Any" {
            cfg.ignore(&["name"]);
            let axis = cfg.required("axis")?;
            let axis = axis.as_i64().ok_or_else(|| {
                cfg.error(
                    "axis",
                    format!(
                        "{} is not supported: kiln reads Any over one axis (an integer), as \
                         Keras writes a Masking layer's mask",
                        short(axis)
                    ),
                )
            })?;
            let keepdims = cfg.bool_or("keepdims", false)?;
            cfg.finish("Any")?;
            let op = MaskOp::Any {
                axis: axis as isize,
                keepdims,
            };
            return Ok((name.clone(), Built::Mask(name.clone(), op)));
        }
        if class == "LogicalOr" {
            cfg.ignore(&["name"]);
            cfg.finish("LogicalOr")?;
            return Ok((name.clone(), Built::Mask(name.clone(), MaskOp::Or)));
        }
        if layers::snake_name(class).is_none() {
            return Err(l.error(
                "class_name",
                format!(
                    "layer `{name}` is a {class}, which kiln does not have; kiln imports {}",
                    layers::CLASSES[..layers::CLASSES.len() - 2]
                        .iter()
                        .map(|(c, _)| *c)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        // The input shapes Keras recorded: kiln's graph gives them.
        l.ignore(&["build_config"]);
        // The layer takes its own name; inside a nested model, the outer model puts the
        // model's name before it (`encoder/dense`), as the slot records.
        let Made {
            layer,
            weights,
            in_cell,
            snake,
        } = layers::make(class, &cfg, &name)?;
        let group = format!("{h5}/{}", groups.next(snake));
        self.slots.push(LayerSlot {
            kiln: format!("{prefix}{name}"),
            vars: if in_cell {
                format!("{group}/cell/vars")
            } else {
                format!("{group}/vars")
            },
            weights,
        });
        Ok((name, Built::Layer(layer)))
    }

    fn functional(&mut self, cfg: &Obj, prefix: &str, h5: &str) -> Result<Graph> {
        let name = cfg.str("name")?.to_string();
        let trainable = layers::model_trainable(cfg)?;
        layers::check_dtype(cfg)?;
        let list = cfg
            .required("layers")?
            .as_array()
            .ok_or_else(|| cfg.error("layers", "expected a list"))?;
        let mut groups = GroupNames::default();
        let mut entries = Vec::new();
        let mut input_specs = Vec::new();
        for (i, v) in list.iter().enumerate() {
            let l = Obj::new(v, cfg.at(&format!("layers[{i}]")), self.file)?;
            let (lname, built) = self.member(&l, prefix, h5, &mut groups)?;
            if matches!(built, Built::Input) {
                let c = l.obj("config")?;
                let shape = c
                    .get("batch_shape")
                    .or_else(|| c.get("batch_input_shape"))
                    .ok_or_else(|| c.error_here("`batch_shape` is missing"))?;
                let shape = sample_shape(self.file, &c.at("batch_shape"), shape)?;
                c.ignore(&["name", "dtype"]);
                for key in ["sparse", "ragged", "optional"] {
                    c.expect(key, |v| v == &Value::Bool(false), &format!("{key} = false"))?;
                }
                c.finish("InputLayer")?;
                input_specs.push((lname.clone(), shape));
            }
            let mut nodes = Vec::new();
            let inbound = l
                .get("inbound_nodes")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (k, n) in inbound.iter().enumerate() {
                let npath = l.at(&format!("inbound_nodes[{k}]"));
                nodes.push(self.node(n, npath, &built)?);
            }
            l.finish("a layer entry")?;
            entries.push(Entry {
                name: lname,
                built,
                nodes,
            });
        }
        let inputs = refs(cfg, "input_layers")?;
        let outputs = refs(cfg, "output_layers")?;
        // The model's inputs in the order of `input_layers`.
        let mut specs = Vec::new();
        for r in &inputs {
            let s = input_specs.iter().find(|(n, _)| *n == r.0).ok_or_else(|| {
                cfg.error(
                    "input_layers",
                    format!("`{}` is not an InputLayer of the model", r.0),
                )
            })?;
            specs.push(s.clone());
        }
        cfg.finish("a Functional model")?;
        let graph = Graph {
            name,
            entries,
            inputs,
            outputs,
            input_specs: specs,
            sequential: false,
            path: cfg.path.clone(),
            filled: Default::default(),
            model: Default::default(),
        };
        if !trainable {
            graph.freeze();
        }
        Ok(graph)
    }

    fn node(&self, n: &Value, path: String, built: &Built) -> Result<Node> {
        let o = Obj::new(n, path.clone(), self.file)?;
        let args_v = o
            .required("args")?
            .as_array()
            .ok_or_else(|| o.error("args", "expected a list"))?;
        let mut args = Vec::new();
        let mut not_equal = None;
        let is_not_equal = matches!(built, Built::Mask(_, MaskOp::NotEqual));
        // `logical_or(a, b)` takes its tensors as two arguments.
        let is_or = matches!(built, Built::Mask(_, MaskOp::Or));
        for (i, a) in args_v.iter().enumerate() {
            let apath = o.at(&format!("args[{i}]"));
            match a {
                Value::Array(items) if i == 0 => {
                    for (j, t) in items.iter().enumerate() {
                        args.push(tensor_arg(
                            self.file,
                            format!("{apath}[{j}]"),
                            t,
                            self.legacy,
                        )?);
                    }
                }
                Value::Object(_) if i == 0 || (is_or && i == 1) => {
                    args.push(tensor_arg(self.file, apath, a, self.legacy)?)
                }
                v if is_not_equal && i == 1 && v.as_f64().is_some_and(f64::is_finite) => {
                    not_equal = v.as_f64();
                }
                v => {
                    return Err(error_at(
                        self.file,
                        &apath,
                        format!(
                            "argument {} is not supported: kiln passes tensors only",
                            short(v)
                        ),
                    ))
                }
            }
        }
        if is_not_equal && (args.len() != 1 || not_equal.is_none()) {
            return Err(o.error(
                "args",
                "kiln reads NotEqual as a mask of one tensor and a number: \
                 keras.ops.not_equal(tokens, 0)",
            ));
        }
        if matches!(built, Built::Mask(_, MaskOp::Any { .. })) && args.len() != 1 {
            return Err(o.error("args", "kiln reads Any of one tensor"));
        }
        if matches!(built, Built::Mask(_, MaskOp::Or)) && args.len() != 2 {
            return Err(o.error("args", "kiln reads LogicalOr of two tensors"));
        }
        let kw = o.obj("kwargs")?;
        let mut mask = Vec::new();
        if let Some(m) = kw.get("mask") {
            let mpath = kw.at("mask");
            match m {
                Value::Null => {}
                Value::Array(items) => {
                    for (j, t) in items.iter().enumerate() {
                        mask.push(if t.is_null() {
                            None
                        } else {
                            Some(tensor_arg(
                                self.file,
                                format!("{mpath}[{j}]"),
                                t,
                                self.legacy,
                            )?)
                        });
                    }
                }
                t => mask.push(Some(tensor_arg(self.file, mpath, t, self.legacy)?)),
            }
        }
        // A recurrent layer's initial states (Keras' `initial_state=[h, c]`): kiln reads them
        // as the layer's inputs after the sequence.
        let given = args.len();
        let initial_path = kw.at("initial_state");
        if let Some(init) = kw.get("initial_state") {
            let ipath = initial_path.clone();
            if !matches!(built, Built::Layer(_)) {
                return Err(error_at(
                    self.file,
                    &ipath,
                    "only a recurrent layer (LSTM, GRU) takes initial_state",
                ));
            }
            match init {
                Value::Null => {}
                Value::Array(items) => {
                    for (j, t) in items.iter().enumerate() {
                        args.push(tensor_arg(
                            self.file,
                            format!("{ipath}[{j}]"),
                            t,
                            self.legacy,
                        )?);
                    }
                }
                t => args.push(tensor_arg(self.file, ipath, t, self.legacy)?),
            }
        }
        // Keras' fit and predict set the training flag of every call themselves.
        kw.expect(
            "training",
            |v| v.is_boolean() || v.is_null(),
            "a training flag",
        )?;
        kw.finish("a call")?;
        o.finish("a node")?;
        if mask.iter().all(Option::is_none) {
            mask.clear();
        } else if mask.len() < args.len() {
            // The masks name the call's arguments; the initial states after them carry none.
            mask.resize_with(args.len(), || None);
        }
        Ok(Node {
            initial: args.len() - given,
            initial_path,
            args,
            mask,
            not_equal,
            path,
        })
    }

    fn sequential(&mut self, cfg: &Obj, prefix: &str, h5: &str) -> Result<Graph> {
        let name = cfg.str("name")?.to_string();
        let trainable = layers::model_trainable(cfg)?;
        layers::check_dtype(cfg)?;
        let list = cfg
            .required("layers")?
            .as_array()
            .ok_or_else(|| cfg.error("layers", "expected a list"))?;
        let mut groups = GroupNames::default();
        let mut entries = Vec::new();
        let mut input = None;
        for (i, v) in list.iter().enumerate() {
            let l = Obj::new(v, cfg.at(&format!("layers[{i}]")), self.file)?;
            if l.get("class_name").and_then(Value::as_str) == Some("InputLayer") {
                // Sequential models keep no group for their InputLayer.
                let c = l.obj("config")?;
                l.ignore(&["module", "registered_name", "name"]);
                let shape = c
                    .get("batch_shape")
                    .or_else(|| c.get("batch_input_shape"))
                    .ok_or_else(|| c.error_here("`batch_shape` is missing"))?;
                let shape = sample_shape(self.file, &c.at("batch_shape"), shape)?;
                let iname = c.str("name")?.to_string();
                c.ignore(&["dtype"]);
                for key in ["sparse", "ragged", "optional"] {
                    c.expect(key, |v| v == &Value::Bool(false), &format!("{key} = false"))?;
                }
                c.finish("InputLayer")?;
                l.finish("a layer entry")?;
                input = Some((iname, shape));
                continue;
            }
            let (lname, built) = self.member(&l, prefix, h5, &mut groups)?;
            if matches!(built, Built::Mask(..)) {
                return Err(l.error(
                    "class_name",
                    "a mask op (NotEqual, Any, LogicalOr) has no place in a Sequential model",
                ));
            }
            l.finish("a layer entry")?;
            entries.push(Entry {
                name: lname,
                built,
                nodes: Vec::new(),
            });
        }
        let input = match input {
            Some(i) => i,
            None => {
                let v = cfg.get("build_input_shape").filter(|v| !v.is_null()).ok_or_else(|| {
                    cfg.error_here("the Sequential model has no InputLayer and no build_input_shape: kiln needs its input shape")
                })?;
                (
                    format!("{name}_input"),
                    sample_shape(self.file, &cfg.at("build_input_shape"), v)?,
                )
            }
        };
        cfg.ignore(&["build_input_shape"]);
        cfg.finish("a Sequential model")?;
        let graph = Graph {
            name,
            entries,
            inputs: Vec::new(),
            outputs: Vec::new(),
            input_specs: vec![input],
            sequential: true,
            path: cfg.path.clone(),
            filled: Default::default(),
            model: Default::default(),
        };
        if !trainable {
            graph.freeze();
        }
        Ok(graph)
    }
}

impl Graph {
    /// Freezes every layer of the model, nested models' included.
    fn freeze(&self) {
        for e in &self.entries {
            match &e.built {
                Built::Layer(l) => l.set_trainable(false),
                Built::Nested(g) => g.freeze(),
                Built::Input | Built::Mask(..) => {}
            }
        }
    }

    /// The shapes kiln computed for the arguments that recorded none, nested models' included:
    /// the JSON path of each argument and its sample shape.
    pub(crate) fn filled_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = self.filled.borrow().clone();
        for e in &self.entries {
            if let Built::Nested(g) = &e.built {
                out.extend(g.filled_shapes());
            }
        }
        out
    }

    /// The top-level model's inputs as kiln inputs, named as in Keras.
    pub(crate) fn kiln_inputs(&self) -> Vec<SymbolicTensor> {
        self.input_specs
            .iter()
            .map(|(n, s)| Input::named(n.clone(), s.clone()))
            .collect()
    }

    /// The names of the layers that make the outputs, as Keras names the outputs.
    pub(crate) fn output_names(&self) -> Vec<String> {
        if self.sequential {
            self.entries
                .last()
                .map(|e| vec![e.name.clone()])
                .unwrap_or_default()
        } else {
            self.outputs.iter().map(|r| r.0.clone()).collect()
        }
    }

    /// The graph as a kiln model of its own, named as in Keras, built once: a model nested in
    /// another is applied as a layer ([`crate::Model::apply_many`]), so its applications share
    /// its weights and the outer model names them `<model>/<layer>/<weight>`.
    fn as_model(&self, file: &str) -> Result<&crate::Model> {
        if let Some(m) = self.model.get() {
            return Ok(m);
        }
        let inputs = self.kiln_inputs();
        let outputs = self.apply(file, &inputs)?;
        let model = crate::Model::builder(&inputs, &outputs)
            .name(self.name.clone())
            .build()
            .map_err(|e| error_at(file, &self.path, format!("model `{}`: {e}", self.name)))?;
        Ok(self.model.get_or_init(|| model))
    }

    /// Applies the model to kiln tensors, returning its outputs.
    pub(crate) fn apply(
        &self,
        file: &str,
        inputs: &[SymbolicTensor],
    ) -> Result<Vec<SymbolicTensor>> {
        let at = |msg: String| error_at(file, &self.path, msg);
        if inputs.len() != self.input_specs.len() {
            return Err(at(format!(
                "model `{}` takes {} inputs but is given {}",
                self.name,
                self.input_specs.len(),
                inputs.len()
            )));
        }
        if self.sequential {
            let mut x = inputs[0].clone();
            for e in &self.entries {
                x = match &e.built {
                    Built::Layer(l) => l
                        .apply(&x)
                        .map_err(|err| at(format!("layer `{}`: {err}", e.name)))?,
                    Built::Nested(g) => {
                        let mut out = g
                            .as_model(file)?
                            .apply_many(&[&x])
                            .map_err(|err| at(format!("model `{}`: {err}", e.name)))?;
                        if out.len() != 1 {
                            return Err(at(format!(
                                "model `{}` in a Sequential model has {} outputs",
                                e.name,
                                out.len()
                            )));
                        }
                        out.remove(0)
                    }
                    Built::Input | Built::Mask(..) => {
                        unreachable!("not kept in a Sequential model")
                    }
                };
            }
            return Ok(vec![x]);
        }
        let mut values: HashMap<Ref, SymbolicTensor> = HashMap::new();
        for (r, t) in self.inputs.iter().zip(inputs) {
            values.insert(r.clone(), t.clone());
        }
        // The outputs of mask ops: masks, never data (but the input of another mask op).
        let mut masks: std::collections::HashSet<Ref> = Default::default();
        let mut done: Vec<Vec<bool>> = self
            .entries
            .iter()
            .map(|e| vec![false; e.nodes.len()])
            .collect();
        loop {
            let mut progress = false;
            let mut pending = None;
            for (ei, e) in self.entries.iter().enumerate() {
                for (k, node) in e.nodes.iter().enumerate() {
                    if done[ei][k] {
                        continue;
                    }
                    let ready = node
                        .args
                        .iter()
                        .chain(node.mask.iter().flatten())
                        .all(|a| values.contains_key(&a.r));
                    if !ready {
                        pending.get_or_insert((&e.name, node));
                        continue;
                    }
                    let mut xs = Vec::new();
                    for a in &node.args {
                        if masks.contains(&a.r) && !matches!(e.built, Built::Mask(..)) {
                            return Err(error_at(
                                file,
                                &a.path,
                                format!(
                                    "the mask `{}` is used as data: kiln reads NotEqual, Any and \
                                     LogicalOr only as masks (a layer's `mask=` argument)",
                                    a.r.0
                                ),
                            ));
                        }
                        let t = &values[&a.r];
                        let Some(shape) = &a.shape else {
                            self.filled
                                .borrow_mut()
                                .push((a.path.clone(), t.shape().to_vec()));
                            xs.push(t.clone());
                            continue;
                        };
                        let keras: Vec<Option<usize>> = shape.iter().skip(1).copied().collect();
                        let fits = keras.len() == t.shape().len()
                            && keras
                                .iter()
                                .zip(t.shape())
                                .all(|(k, d)| k.is_none_or(|k| k == *d));
                        if !fits {
                            return Err(error_at(
                                file,
                                &a.path,
                                format!(
                                    "Keras recorded shape {:?} here but kiln computes {:?}",
                                    shape,
                                    t.shape()
                                ),
                            ));
                        }
                        xs.push(t.clone());
                    }
                    let explicit: Vec<Option<&SymbolicTensor>> = node
                        .mask
                        .iter()
                        .map(|m| m.as_ref().map(|a| &values[&a.r]))
                        .collect();
                    let refs: Vec<&SymbolicTensor> = xs.iter().collect();
                    let layer_error = |err: crate::Error| {
                        error_at(file, &node.path, format!("layer `{}`: {err}", e.name))
                    };
                    match &e.built {
                        Built::Layer(l)
                            if node.initial > 0 && !matches!(l.lock().kind(), "lstm" | "gru") =>
                        {
                            return Err(error_at(
                                file,
                                &node.initial_path,
                                format!(
                                    "layer `{}` is given initial_state, which only a recurrent \
                                     layer (LSTM, GRU) takes",
                                    e.name
                                ),
                            ));
                        }
                        Built::Layer(l) => {
                            // Every output, by its index in Keras' `keras_history`.
                            let ys = l
                                .apply_outputs_with_masks(&refs, &explicit)
                                .map_err(layer_error)?;
                            for (j, y) in ys.into_iter().enumerate() {
                                values.insert((e.name.clone(), k, j), y);
                            }
                        }
                        Built::Nested(g) => {
                            // Keras' Functional.call zips the masks with the inputs: one
                            // missing is none, one too many is never read.
                            let mut explicit = explicit;
                            if !explicit.is_empty() {
                                explicit.resize(refs.len(), None);
                            }
                            let outs = g
                                .as_model(file)?
                                .apply_many_with_masks(&refs, &explicit)
                                .map_err(layer_error)?;
                            for (j, y) in outs.into_iter().enumerate() {
                                values.insert((e.name.clone(), k, j), y);
                            }
                        }
                        Built::Mask(kiln_name, op) => {
                            let y = match *op {
                                MaskOp::NotEqual => {
                                    let value = node.not_equal.expect("checked when read");
                                    NotEqual::new(value)
                                        .with_name(kiln_name.clone())
                                        .apply_many(&refs)
                                }
                                MaskOp::Any { axis, keepdims } => ReduceAny::new(axis)
                                    .keepdims(keepdims)
                                    .with_name(kiln_name.clone())
                                    .apply_many(&refs),
                                MaskOp::Or => LogicalOr::new()
                                    .with_name(kiln_name.clone())
                                    .apply_many(&refs),
                            }
                            .map_err(layer_error)?;
                            masks.insert((e.name.clone(), k, 0));
                            values.insert((e.name.clone(), k, 0), y);
                        }
                        Built::Input => {}
                    }
                    done[ei][k] = true;
                    progress = true;
                }
            }
            if done.iter().all(|d| d.iter().all(|x| *x)) {
                break;
            }
            if !progress {
                let (name, node) = pending.expect("some node is pending");
                return Err(error_at(
                    file,
                    &node.path,
                    format!(
                        "layer `{name}` takes a tensor that no layer of model `{}` makes",
                        self.name
                    ),
                ));
            }
        }
        self.outputs
            .iter()
            .map(|r| {
                values
                    .get(r)
                    .cloned()
                    .ok_or_else(|| at(format!("output {r:?} is made by no layer")))
            })
            .collect()
    }
}
