//! One Keras layer's `config` to the kiln layer that computes the same thing, with every option
//! Keras writes either carried over, checked to be one kiln computes exactly, or refused naming
//! it. Initializers are read past: the file gives the weights.

use super::json::{short, Obj};
use crate::activations::Activation;
use crate::error::{Error, Result};
use crate::graph::SharedLayer;
use crate::layers::channels_first::in_format;
use crate::layers::{
    ActivationLayer, Add, AveragePooling1D, AveragePooling2D, BatchNormalization, Concatenate,
    Conv1D, Conv2D, Dense, Dropout, Embedding, Flatten, GlobalAveragePooling1D,
    GlobalAveragePooling2D, GlobalMaxPooling1D, GlobalMaxPooling2D, Gru, LayerExt,
    LayerNormalization, Lstm, Masking, MaxPooling1D, MaxPooling2D, Multiply, Normalization,
    Padding, Permute, Reshape,
};
use crate::losses::config::JsonParams;
use crate::regularizers::SharedRegularizer;
use serde_json::Value;

/// A kiln layer made from a Keras layer, and where its weights sit in `model.weights.h5`.
pub(crate) struct Made {
    pub(crate) layer: SharedLayer,
    /// kiln's weight names (after `<layer>/`), in the order Keras stores them (`vars/0`, …).
    pub(crate) weights: Vec<&'static str>,
    /// Recurrent layers keep their weights in their cell (`<layer>/cell/vars/…`).
    pub(crate) in_cell: bool,
    /// The Keras class, for messages and export.
    pub(crate) snake: &'static str,
}

/// The Keras classes kiln imports, with the name Keras gives their group in the weights file.
pub(crate) const CLASSES: [(&str, &str); 28] = [
    ("Dense", "dense"),
    ("Activation", "activation"),
    ("Dropout", "dropout"),
    ("Flatten", "flatten"),
    ("Reshape", "reshape"),
    ("Permute", "permute"),
    ("Conv1D", "conv1d"),
    ("Conv2D", "conv2d"),
    ("MaxPooling1D", "max_pooling1d"),
    ("MaxPooling2D", "max_pooling2d"),
    ("AveragePooling1D", "average_pooling1d"),
    ("AveragePooling2D", "average_pooling2d"),
    ("GlobalAveragePooling1D", "global_average_pooling1d"),
    ("GlobalAveragePooling2D", "global_average_pooling2d"),
    ("GlobalMaxPooling1D", "global_max_pooling1d"),
    ("GlobalMaxPooling2D", "global_max_pooling2d"),
    ("BatchNormalization", "batch_normalization"),
    ("LayerNormalization", "layer_normalization"),
    ("Embedding", "embedding"),
    ("Masking", "masking"),
    ("Normalization", "normalization"),
    ("LSTM", "lstm"),
    ("GRU", "gru"),
    ("Concatenate", "concatenate"),
    ("Add", "add"),
    ("Multiply", "multiply"),
    ("InputLayer", "input_layer"),
    ("Functional", "functional"),
];

/// The weights Keras stores for a layer of `class` (`vars/0`, `vars/1`, … in this order, each
/// only when the layer has it), and whether they sit in the layer's `cell` group.
pub(crate) fn keras_weights(class: &str) -> (&'static [&'static str], bool) {
    match class {
        "Dense" | "Conv1D" | "Conv2D" => (&["kernel", "bias"], false),
        "BatchNormalization" => (&["gamma", "beta", "moving_mean", "moving_variance"], false),
        "LayerNormalization" => (&["gamma", "beta"], false),
        "Normalization" => (&["mean", "variance", "count"], false),
        "Embedding" => (&["embeddings"], false),
        "LSTM" | "GRU" => (&["kernel", "recurrent_kernel", "bias"], true),
        _ => (&[], false),
    }
}

/// The group name Keras gives a layer of this class in the weights file (its snake-case class
/// name), for the classes kiln knows.
pub(crate) fn snake_name(class: &str) -> Option<&'static str> {
    match class {
        "Sequential" => Some("sequential"),
        _ => CLASSES.iter().find(|(c, _)| *c == class).map(|(_, s)| *s),
    }
}

/// Whether a model config is trainable: a model saved with `trainable: false` as a whole has
/// every layer in it frozen, as Keras' `model.trainable = False` does.
pub(crate) fn model_trainable(cfg: &Obj) -> Result<bool> {
    cfg.bool_or("trainable", true)
}

/// Requires the float32 dtype policy (kiln computes in float32).
pub(crate) fn check_dtype(cfg: &Obj) -> Result<()> {
    let Some(v) = cfg.get("dtype") else {
        return Ok(());
    };
    let name = match v {
        Value::String(s) => Some(s.as_str()),
        Value::Object(o) => o
            .get("config")
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str),
        Value::Null => Some("float32"),
        _ => None,
    };
    match name {
        Some("float32") => Ok(()),
        _ => Err(cfg.error(
            "dtype",
            format!(
                "dtype policy {} is not supported: kiln computes in float32",
                short(v)
            ),
        )),
    }
}

fn activation(cfg: &Obj, key: &str) -> Result<Activation> {
    let v = cfg.required(key)?;
    let name = v.as_str().ok_or_else(|| {
        cfg.error(
            key,
            format!(
                "activation {} is not a built-in name: kiln never runs code from a file",
                short(v)
            ),
        )
    })?;
    let name = if name == "swish" { "silu" } else { name };
    name.parse()
        .map_err(|_| cfg.error(key, format!("kiln has no activation `{name}`")))
}

/// A regularizer option: `null`, or a built-in Keras regularizer.
fn regularizer(cfg: &Obj, key: &str) -> Result<Option<SharedRegularizer>> {
    let Some(v) = cfg.get(key) else {
        return Ok(None);
    };
    if v.is_null() {
        return Ok(None);
    }
    let o = Obj::new(v, cfg.at(key), cfg.file)?;
    let class = o.str("class_name")?;
    // Keras marks an object serialized at several places with `shared_object_id`; a
    // regularizer holds no state, so a shared one penalizes each weight as a copy would.
    o.ignore(&["module", "shared_object_id"]);
    o.expect(
        "registered_name",
        |r| r.is_null() || r.as_str() == Some(class),
        "built-in regularizers (L1, L2, L1L2, OrthogonalRegularizer)",
    )?;
    let params = o.required("config")?;
    let place = o.at("config");
    let reg = crate::regularizers::regularizer_from_config(class, &JsonParams::new(params, place))
        .map_err(|e| Error::Data(format!("{}: {e}", cfg.file)))?;
    o.finish("a regularizer")?;
    Ok(Some(reg))
}

/// A layer builder with its kernel and bias constraints, those given.
macro_rules! constrained {
    ($b:expr, $kernel:expr, $bias:expr) => {{
        let mut b = $b;
        if let Some(c) = $kernel.clone() {
            b = b.kernel_constraint(c);
        }
        if let Some(c) = $bias.clone() {
            b = b.bias_constraint(c);
        }
        b
    }};
}

/// A constraint option: `null`, or a built-in Keras constraint (MaxNorm, MinMaxNorm, NonNeg,
/// UnitNorm) with its config.
fn constraint(cfg: &Obj, key: &str) -> Result<Option<crate::constraints::Constraint>> {
    let Some(v) = cfg.get(key) else {
        return Ok(None);
    };
    if v.is_null() {
        return Ok(None);
    }
    let o = Obj::new(v, cfg.at(key), cfg.file)?;
    let class = o.str("class_name")?;
    o.ignore(&["module", "shared_object_id"]);
    o.expect(
        "registered_name",
        |r| r.is_null() || r.as_str() == Some(class),
        "built-in constraints (MaxNorm, MinMaxNorm, NonNeg, UnitNorm)",
    )?;
    let params = o.required("config")?;
    let c = crate::constraints::Constraint::from_keras(
        class,
        params,
        &format!("{}: {}", cfg.file, o.at("config")),
    )?;
    o.finish("a constraint")?;
    Ok(Some(c))
}

fn padding(cfg: &Obj) -> Result<Padding> {
    let p = cfg.str("padding")?;
    p.parse().map_err(|e| cfg.error("padding", format!("{e}")))
}

/// Whether the layer's `data_format` is `channels_first` (then kiln runs the channels-last
/// layer inside [`crate::layers::ChannelsFirst`]); absent or null is Keras' default, channels_last.
fn channels_first(cfg: &Obj) -> Result<bool> {
    match cfg.get("data_format") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::String(f)) if f == "channels_last" => Ok(false),
        Some(Value::String(f)) if f == "channels_first" => Ok(true),
        Some(other) => Err(cfg.error(
            "data_format",
            format!(
                "{} is not a data format: use \"channels_last\" or \"channels_first\"",
                short(other)
            ),
        )),
    }
}

/// The axes of a normalization layer as Keras writes them: one integer or a list (Keras 2
/// writes BatchNormalization's as a list of one), batch axis 0, negative from the end.
fn axes(cfg: &Obj, key: &str) -> Result<Vec<isize>> {
    let v = cfg.required(key)?;
    let list = match v {
        Value::Array(a) => a.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>(),
        one => one.as_i64().map(|a| vec![a]),
    };
    list.filter(|l| !l.is_empty())
        .map(|l| l.into_iter().map(|a| a as isize).collect())
        .ok_or_else(|| {
            cfg.error(
                key,
                format!("expected an axis or a list of axes, got {}", short(v)),
            )
        })
}

/// A statistic Keras' Normalization was given (`mean=`, `variance=`): a number or nested lists
/// of numbers, as a tensor of that shape.
fn stat(cfg: &Obj, key: &str, v: &Value) -> Result<candle_core::Tensor> {
    // The shape follows the first elements; every element must then fit it.
    fn walk(v: &Value, shape: &[usize], out: &mut Vec<f64>) -> Option<()> {
        match (v, shape.split_first()) {
            (Value::Array(a), Some((&n, rest))) if a.len() == n => {
                a.iter().try_for_each(|x| walk(x, rest, out))
            }
            (x, None) => {
                out.push(x.as_f64().filter(|f| f.is_finite())?);
                Some(())
            }
            _ => None,
        }
    }
    let mut shape = Vec::new();
    let mut first = v;
    while let Value::Array(a) = first {
        shape.push(a.len());
        match a.first() {
            Some(x) => first = x,
            None => break,
        }
    }
    let mut values = Vec::new();
    walk(v, &shape, &mut values).ok_or_else(|| {
        cfg.error(
            key,
            format!(
                "expected a number or nested lists of finite numbers of one shape, got {}",
                short(v)
            ),
        )
    })?;
    Ok(candle_core::Tensor::from_vec(
        values,
        shape,
        &candle_core::Device::Cpu,
    )?)
}

/// Regularizers of a layer builder that has the three usual ones.
macro_rules! regularized {
    ($b:expr, $cfg:expr, $kernel:literal) => {{
        let mut b = $b;
        if let Some(r) = regularizer($cfg, $kernel)? {
            b = b.kernel_regularizer(r);
        }
        if let Some(r) = regularizer($cfg, "bias_regularizer")? {
            b = b.bias_regularizer(r);
        }
        if let Some(r) = regularizer($cfg, "activity_regularizer")? {
            b = b.activity_regularizer(r);
        }
        b
    }};
}

/// The kiln layer for a Keras layer of `class` with `cfg`, named `name` in kiln.
pub(crate) fn make(class: &str, cfg: &Obj, name: &str) -> Result<Made> {
    cfg.ignore(&["name"]);
    // A frozen layer stays frozen in kiln (no update, no regularizer term, BatchNormalization
    // in inference mode), as Keras trains it.
    let trainable = cfg.bool_or("trainable", true)?;
    check_dtype(cfg)?;
    let snake = snake_name(class).unwrap_or("layer");
    let name = name.to_string();
    let plain = |layer: SharedLayer| Made {
        layer,
        weights: Vec::new(),
        in_cell: false,
        snake,
    };
    let made = match class {
        "Dense" => {
            let use_bias = cfg.bool("use_bias")?;
            let kernel_c = constraint(cfg, "kernel_constraint")?;
            let bias_c = constraint(cfg, "bias_constraint")?;
            cfg.ignore(&["kernel_initializer", "bias_initializer"]);
            cfg.expect_null("quantization_config", "quantization")?;
            cfg.expect_null("lora_rank", "LoRA")?;
            cfg.ignore(&["lora_alpha"]);
            let mut d = Dense::new(cfg.positive("units")?)
                .activation(activation(cfg, "activation")?)
                .use_bias(use_bias)
                .with_name(name);
            if let Some(c) = kernel_c {
                d = d.kernel_constraint(c);
            }
            if let Some(c) = bias_c {
                d = d.bias_constraint(c);
            }
            Made {
                layer: regularized!(d, cfg, "kernel_regularizer").shared(),
                weights: if use_bias {
                    vec!["kernel", "bias"]
                } else {
                    vec!["kernel"]
                },
                in_cell: false,
                snake,
            }
        }
        "Conv1D" | "Conv2D" => {
            let n = if class == "Conv1D" { 1 } else { 2 };
            let use_bias = cfg.bool("use_bias")?;
            let kernel_c = constraint(cfg, "kernel_constraint")?;
            let bias_c = constraint(cfg, "bias_constraint")?;
            cfg.ignore(&["kernel_initializer", "bias_initializer"]);
            let first = channels_first(cfg)?;
            let groups = cfg.positive("groups")?;
            let filters = cfg.positive("filters")?;
            let kernel = cfg.sizes("kernel_size", n)?;
            let strides = cfg.sizes("strides", n)?;
            let dilation = cfg.sizes("dilation_rate", n)?;
            let pad = padding(cfg)?;
            let act = activation(cfg, "activation")?;
            let layer = if n == 1 {
                let c = Conv1D::new(filters, kernel[0])
                    .groups(groups)
                    .strides(strides[0])
                    .dilation_rate(dilation[0])
                    .padding(pad)
                    .activation(act)
                    .use_bias(use_bias)
                    .with_name(name);
                let c = constrained!(c, kernel_c, bias_c);
                in_format(regularized!(c, cfg, "kernel_regularizer"), first)
            } else {
                let c = Conv2D::new(filters, (kernel[0], kernel[1]))
                    .groups(groups)
                    .strides((strides[0], strides[1]))
                    .dilation_rate((dilation[0], dilation[1]))
                    .padding(pad)
                    .activation(act)
                    .use_bias(use_bias)
                    .with_name(name);
                let c = constrained!(c, kernel_c, bias_c);
                in_format(regularized!(c, cfg, "kernel_regularizer"), first)
            };
            Made {
                layer,
                weights: if use_bias {
                    vec!["kernel", "bias"]
                } else {
                    vec!["kernel"]
                },
                in_cell: false,
                snake,
            }
        }
        "MaxPooling1D" | "AveragePooling1D" => {
            let first = channels_first(cfg)?;
            let size = cfg.sizes("pool_size", 1)?[0];
            let strides = match cfg.get("strides") {
                Some(Value::Null) | None => size,
                Some(_) => cfg.sizes("strides", 1)?[0],
            };
            let pad = padding(cfg)?;
            plain(if class == "MaxPooling1D" {
                in_format(
                    MaxPooling1D::new(size)
                        .strides(strides)
                        .padding(pad)
                        .with_name(name),
                    first,
                )
            } else {
                in_format(
                    AveragePooling1D::new(size)
                        .strides(strides)
                        .padding(pad)
                        .with_name(name),
                    first,
                )
            })
        }
        "MaxPooling2D" | "AveragePooling2D" => {
            let first = channels_first(cfg)?;
            let size = cfg.sizes("pool_size", 2)?;
            let strides = match cfg.get("strides") {
                Some(Value::Null) | None => size.clone(),
                Some(_) => cfg.sizes("strides", 2)?,
            };
            let pad = padding(cfg)?;
            let (s, st) = ((size[0], size[1]), (strides[0], strides[1]));
            plain(if class == "MaxPooling2D" {
                in_format(
                    MaxPooling2D::new(s)
                        .strides(st)
                        .padding(pad)
                        .with_name(name),
                    first,
                )
            } else {
                in_format(
                    AveragePooling2D::new(s)
                        .strides(st)
                        .padding(pad)
                        .with_name(name),
                    first,
                )
            })
        }
        "GlobalAveragePooling1D"
        | "GlobalAveragePooling2D"
        | "GlobalMaxPooling1D"
        | "GlobalMaxPooling2D" => {
            let first = channels_first(cfg)?;
            let keep = cfg.bool_or("keepdims", false)?;
            plain(match class {
                "GlobalAveragePooling1D" => in_format(
                    GlobalAveragePooling1D::new().keepdims(keep).with_name(name),
                    first,
                ),
                "GlobalAveragePooling2D" => in_format(
                    GlobalAveragePooling2D::new().keepdims(keep).with_name(name),
                    first,
                ),
                "GlobalMaxPooling1D" => in_format(
                    GlobalMaxPooling1D::new().keepdims(keep).with_name(name),
                    first,
                ),
                _ => in_format(
                    GlobalMaxPooling2D::new().keepdims(keep).with_name(name),
                    first,
                ),
            })
        }
        "BatchNormalization" => {
            let axis = match axes(cfg, "axis")?.as_slice() {
                [one] => *one,
                _ => {
                    return Err(cfg.error(
                        "axis",
                        "BatchNormalization normalizes one feature axis: give one integer",
                    ))
                }
            };
            cfg.ignore(&["beta_initializer", "gamma_initializer"]);
            cfg.ignore(&[
                "moving_mean_initializer",
                "moving_variance_initializer",
                "renorm_momentum",
            ]);
            cfg.expect("renorm", |v| v == &Value::Bool(false), "renorm = false")?;
            cfg.expect_null("renorm_clipping", "renormalization clipping")?;
            let (center, scale) = (cfg.bool("center")?, cfg.bool("scale")?);
            let mut b = BatchNormalization::new()
                .axis(axis)
                .momentum(cfg.f64("momentum")?)
                .epsilon(cfg.f64("epsilon")?)
                .center(center)
                .scale(scale)
                .synchronized(cfg.bool_or("synchronized", false)?)
                .with_name(name);
            if let Some(r) = regularizer(cfg, "gamma_regularizer")? {
                b = b.gamma_regularizer(r);
            }
            if let Some(r) = regularizer(cfg, "beta_regularizer")? {
                b = b.beta_regularizer(r);
            }
            if let Some(c) = constraint(cfg, "gamma_constraint")? {
                b = b.gamma_constraint(c);
            }
            if let Some(c) = constraint(cfg, "beta_constraint")? {
                b = b.beta_constraint(c);
            }
            let mut weights = Vec::new();
            if scale {
                weights.push("gamma");
            }
            if center {
                weights.push("beta");
            }
            weights.extend(["moving_mean", "moving_variance"]);
            Made {
                layer: b.shared(),
                weights,
                in_cell: false,
                snake,
            }
        }
        "LayerNormalization" => {
            let axes = axes(cfg, "axis")?;
            cfg.ignore(&["beta_initializer", "gamma_initializer"]);
            cfg.expect(
                "rms_scaling",
                |v| v == &Value::Bool(false),
                "rms_scaling = false",
            )?;
            let (center, scale) = (cfg.bool("center")?, cfg.bool("scale")?);
            let mut l = LayerNormalization::new()
                .axes(&axes)
                .epsilon(cfg.f64("epsilon")?)
                .center(center)
                .scale(scale)
                .with_name(name);
            if let Some(r) = regularizer(cfg, "gamma_regularizer")? {
                l = l.gamma_regularizer(r);
            }
            if let Some(r) = regularizer(cfg, "beta_regularizer")? {
                l = l.beta_regularizer(r);
            }
            if let Some(c) = constraint(cfg, "gamma_constraint")? {
                l = l.gamma_constraint(c);
            }
            if let Some(c) = constraint(cfg, "beta_constraint")? {
                l = l.beta_constraint(c);
            }
            let mut weights = Vec::new();
            if scale {
                weights.push("gamma");
            }
            if center {
                weights.push("beta");
            }
            Made {
                layer: l.shared(),
                weights,
                in_cell: false,
                snake,
            }
        }
        "Embedding" => {
            cfg.ignore(&["embeddings_initializer"]);
            cfg.expect_null("quantization_config", "quantization")?;
            cfg.expect_null("lora_rank", "LoRA")?;
            cfg.ignore(&["lora_alpha"]);
            cfg.expect("sparse", |v| v == &Value::Bool(false), "sparse = false")?;
            let mut e = Embedding::new(cfg.positive("input_dim")?, cfg.positive("output_dim")?)
                .mask_zero(cfg.bool("mask_zero")?)
                .with_name(name);
            if let Some(r) = regularizer(cfg, "embeddings_regularizer")? {
                e = e.embeddings_regularizer(r);
            }
            if let Some(c) = constraint(cfg, "embeddings_constraint")? {
                e = e.embeddings_constraint(c);
            }
            if let Some(r) = regularizer(cfg, "activity_regularizer")? {
                e = e.activity_regularizer(r);
            }
            Made {
                layer: e.shared(),
                weights: vec!["embeddings"],
                in_cell: false,
                snake,
            }
        }
        "LSTM" | "GRU" => {
            let use_bias = cfg.bool("use_bias")?;
            cfg.ignore(&[
                "kernel_initializer",
                "recurrent_initializer",
                "bias_initializer",
            ]);
            let kernel_c = constraint(cfg, "kernel_constraint")?;
            let recurrent_c = constraint(cfg, "recurrent_constraint")?;
            let bias_c = constraint(cfg, "bias_constraint")?;
            cfg.expect("stateful", |v| v == &Value::Bool(false), "stateful = false")?;
            let return_state = cfg.bool_or("return_state", false)?;
            let dropout = cfg.f64("dropout")?;
            let recurrent_dropout = cfg.f64("recurrent_dropout")?;
            let return_sequences = cfg.bool("return_sequences")?;
            let go_backwards = cfg.bool_or("go_backwards", false)?;
            // Keras' default carries the last output over masked steps, as kiln does.
            cfg.expect(
                "zero_output_for_mask",
                |v| v == &Value::Bool(false) || !return_sequences,
                "zero_output_for_mask = false with return_sequences",
            )?;
            // Unrolling, the dropout's seed (kiln draws from its own seeded generator) and the
            // cuDNN choice change no value.
            cfg.ignore(&["unroll", "seed", "use_cudnn"]);
            let units = cfg.positive("units")?;
            let act = activation(cfg, "activation")?;
            let rec = activation(cfg, "recurrent_activation")?;
            macro_rules! recurrent {
                ($l:expr) => {{
                    let mut l = $l
                        .dropout(dropout)
                        .recurrent_dropout(recurrent_dropout)
                        .activation(act)
                        .recurrent_activation(rec)
                        .use_bias(use_bias)
                        .return_sequences(return_sequences)
                        .return_state(return_state)
                        .go_backwards(go_backwards)
                        .with_name(name);
                    if let Some(r) = regularizer(cfg, "recurrent_regularizer")? {
                        l = l.recurrent_regularizer(r);
                    }
                    if let Some(c) = recurrent_c.clone() {
                        l = l.recurrent_constraint(c);
                    }
                    let l = constrained!(l, kernel_c, bias_c);
                    regularized!(l, cfg, "kernel_regularizer").shared()
                }};
            }
            let layer = if class == "LSTM" {
                recurrent!(Lstm::new(units).unit_forget_bias(cfg.bool("unit_forget_bias")?))
            } else {
                recurrent!(Gru::new(units).reset_after(cfg.bool("reset_after")?))
            };
            let mut weights = vec!["kernel", "recurrent_kernel"];
            if use_bias {
                weights.push("bias");
            }
            Made {
                layer,
                weights,
                in_cell: true,
                snake,
            }
        }
        "Dropout" => {
            cfg.expect_null("noise_shape", "a noise_shape")?;
            // kiln draws the dropped units from its own seeded generator.
            cfg.ignore(&["seed"]);
            let rate = cfg.f64("rate")?;
            plain(Dropout::new(rate).with_name(name).shared())
        }
        "Activation" => plain(
            ActivationLayer::new(activation(cfg, "activation")?)
                .with_name(name)
                .shared(),
        ),
        "Flatten" => {
            let first = channels_first(cfg)?;
            plain(in_format(Flatten::new().with_name(name), first))
        }
        "Reshape" => {
            let v = cfg.required("target_shape")?;
            let dims = v
                .as_array()
                .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
                .ok_or_else(|| {
                    cfg.error(
                        "target_shape",
                        format!("expected a list of integers, got {}", short(v)),
                    )
                })?;
            let dims: Vec<isize> = dims.into_iter().map(|d| d as isize).collect();
            plain(Reshape::new(dims).with_name(name).shared())
        }
        "Permute" => {
            let v = cfg.required("dims")?;
            let dims = v
                .as_array()
                .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
                .ok_or_else(|| {
                    cfg.error("dims", format!("expected a list of axes, got {}", short(v)))
                })?;
            let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
            plain(Permute::new(dims).with_name(name).shared())
        }
        "Normalization" => {
            let axes = match cfg.required("axis")? {
                Value::Null => Vec::new(),
                v => {
                    let list = match v {
                        Value::Array(a) => a.clone(),
                        one => vec![one.clone()],
                    };
                    list.iter()
                        .map(|a| a.as_i64().map(|a| a as isize))
                        .collect::<Option<Vec<isize>>>()
                        .ok_or_else(|| {
                            cfg.error(
                                "axis",
                                format!(
                                    "expected an axis, a list of axes or null, got {}",
                                    short(v)
                                ),
                            )
                        })?
                }
            };
            let mut n = Normalization::new()
                .axes(&axes)
                .invert(cfg.bool_or("invert", false)?)
                .with_name(name);
            let given = (
                cfg.get("mean").filter(|v| !v.is_null()),
                cfg.get("variance").filter(|v| !v.is_null()),
            );
            let weights =
                match given {
                    (None, None) => vec!["mean", "variance", "count"],
                    (Some(m), Some(v)) => {
                        let (m, v) = (stat(cfg, "mean", m)?, stat(cfg, "variance", v)?);
                        n = n
                            .mean_variance(&m, &v)
                            .map_err(|e| cfg.error("mean", format!("{e}")))?;
                        Vec::new()
                    }
                    _ => return Err(cfg.error_here(
                        "Normalization gives `mean` without `variance` or the reverse: give both \
                         or neither",
                    )),
                };
            Made {
                layer: n.shared(),
                weights,
                in_cell: false,
                snake,
            }
        }
        "Masking" => plain(
            Masking::new(cfg.f64("mask_value")?)
                .with_name(name)
                .shared(),
        ),
        "Concatenate" => {
            let axis = cfg.required("axis")?;
            let axis = axis.as_i64().ok_or_else(|| {
                cfg.error("axis", format!("expected an integer, got {}", short(axis)))
            })?;
            plain(
                Concatenate::new()
                    .axis(axis as isize)
                    .with_name(name)
                    .shared(),
            )
        }
        "Add" => plain(Add::new().with_name(name).shared()),
        "Multiply" => plain(Multiply::new().with_name(name).shared()),
        other => unreachable!("the caller checks the class first: {other}"),
    };
    cfg.finish(class)?;
    made.layer.set_trainable(trainable);
    Ok(made)
}
