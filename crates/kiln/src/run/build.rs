//! Turning the `[model]`, `[compile]`, `[[added]]` and `[fit]` sections into a model, its
//! compile configuration, its added terms and its fit options.

use super::fields::{Fields, TableParams, Value};
use crate::activations::Activation;
use crate::adversarial::{Adversarial, PerturbationNorm};
use crate::callbacks::{self, Schedule};
use crate::error::Result;
use crate::graph::{Input, SymbolicTensor};
use crate::layers::channels_first::in_format;
use crate::layers::{
    ActivationLayer, Add, AveragePooling1D, AveragePooling2D, BatchNormalization, Concatenate,
    Conv1D, Conv2D, Dense, Dropout, Embedding, Flatten, GlobalAveragePooling1D,
    GlobalAveragePooling2D, GlobalMaxPooling1D, GlobalMaxPooling2D, Gru, LayerExt,
    LayerNormalization, Lstm, Masking, MaxPooling1D, MaxPooling2D, Multiply, Normalization,
    Padding, Reshape,
};
use crate::losses::config::Bounds;
use crate::losses::LossSpec;
use crate::metrics::MetricSpec;
use crate::model::{Compile, Fit, Model, Tensors};
use crate::optimizers::{
    Adadelta, Adagrad, Adam, AdamW, Adamax, LearningRateSchedule, Lion, Nadam, Optimizer, RmsProp,
    Sgd,
};
use crate::reduction::Reduction;
use crate::regularizers::{self, OrthogonalMode, SharedRegularizer};
use std::collections::HashMap;
use std::sync::Arc;

fn regularizer(f: &Fields) -> Result<SharedRegularizer> {
    // The factors of Keras' regularizers: finite and >= 0 (a negative one rewards large weights).
    let l1 = f.f64_in("l1", Bounds::non_negative())?;
    let l2 = f.f64_in("l2", Bounds::non_negative())?;
    let orthogonal = f.f64_in("orthogonal", Bounds::non_negative())?;
    let mode = f.str("mode")?;
    f.finish()?;
    Ok(match (l1, l2, orthogonal) {
        (Some(a), Some(b), None) => Arc::new(regularizers::L1L2::new(a, b)),
        (Some(a), None, None) => Arc::new(regularizers::L1::new(a)),
        (None, Some(b), None) => Arc::new(regularizers::L2::new(b)),
        (None, None, Some(factor)) => {
            let mode = match mode.unwrap_or("rows") {
                "rows" => OrthogonalMode::Rows,
                "columns" => OrthogonalMode::Columns,
                m => {
                    return Err(f.error(format!(
                        "unknown orthogonal mode `{m}`: use rows or columns"
                    )))
                }
            };
            Arc::new(regularizers::Orthogonal::new(factor).mode(mode))
        }
        _ => {
            return Err(f.error("give `l1`, `l2`, both, or `orthogonal` (with an optional `mode`)"))
        }
    })
}

/// A weight constraint table: `{ type = "max_norm", max_value = 2.0, axis = 0 }`,
/// `min_max_norm` (`min_value`, `max_value`, `rate`, `axis`), `non_neg`, `unit_norm` (`axis`);
/// Keras' defaults for what is left out, unknown keys refused. `axis` is an integer or a list.
fn constraint(f: &Fields) -> Result<crate::constraints::Constraint> {
    use crate::constraints::{Axis, Constraint};
    let kind = f.required_str("type")?;
    let axis = || -> Result<Axis> {
        let Some(v) = f.get("axis") else {
            return Ok(Axis::One(0));
        };
        if let Some(i) = super::fields::integer(v.get_ref()) {
            return Ok(Axis::One(i));
        }
        let items = v
            .get_ref()
            .as_array()
            .ok_or_else(|| f.value_error("axis", v, "expected an integer or a list of integers"))?;
        items
            .iter()
            .map(|i| {
                super::fields::integer(i.get_ref())
                    .ok_or_else(|| f.value_error("axis", i, "expected an integer"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Axis::Many)
    };
    let c = match kind {
        "max_norm" => Constraint::MaxNorm {
            max_value: f.f64_or("max_value", 2.0)?,
            axis: axis()?,
        },
        "min_max_norm" => Constraint::MinMaxNorm {
            min_value: f.f64_or("min_value", 0.0)?,
            max_value: f.f64_or("max_value", 1.0)?,
            rate: f.f64_or("rate", 1.0)?,
            axis: axis()?,
        },
        "non_neg" => Constraint::NonNeg,
        "unit_norm" => Constraint::UnitNorm { axis: axis()? },
        other => {
            return Err(f.error(format!(
                "unknown constraint `{other}`: use max_norm, min_max_norm, non_neg or unit_norm"
            )))
        }
    };
    f.finish()?;
    c.validate().map_err(|e| f.error(e))?;
    Ok(c)
}

/// Attaches the `kernel_regularizer`, `bias_regularizer` and `activity_regularizer` tables of a
/// layer entry to a layer builder that has those three methods (Dense, Conv1D, Conv2D).
macro_rules! with_regularizers {
    ($builder:expr, $fields:expr) => {{
        let mut b = $builder;
        if let Some(r) = $fields.table("kernel_regularizer")? {
            b = b.kernel_regularizer(regularizer(&r)?);
        }
        if let Some(r) = $fields.table("bias_regularizer")? {
            b = b.bias_regularizer(regularizer(&r)?);
        }
        if let Some(r) = $fields.table("activity_regularizer")? {
            b = b.activity_regularizer(regularizer(&r)?);
        }
        b
    }};
}

/// Attaches the `kernel_constraint` and `bias_constraint` tables of a layer entry (Dense,
/// Conv1D, Conv2D).
macro_rules! with_constraints {
    ($builder:expr, $fields:expr) => {{
        let mut b = $builder;
        if let Some(c) = $fields.table("kernel_constraint")? {
            b = b.kernel_constraint(constraint(&c)?);
        }
        if let Some(c) = $fields.table("bias_constraint")? {
            b = b.bias_constraint(constraint(&c)?);
        }
        b
    }};
}

/// The layer types a run file can name.
pub(crate) const LAYER_TYPES: [&str; 24] = [
    "dense",
    "dropout",
    "activation",
    "flatten",
    "conv1d",
    "conv2d",
    "max_pooling1d",
    "average_pooling1d",
    "max_pooling2d",
    "average_pooling2d",
    "global_average_pooling1d",
    "global_average_pooling2d",
    "global_max_pooling1d",
    "global_max_pooling2d",
    "batch_normalization",
    "layer_normalization",
    "embedding",
    "masking",
    "lstm",
    "gru",
    "reshape",
    "concatenate",
    "add",
    "multiply",
];

/// An integer, or a list of two, as `(height, width)`.
fn size_pair(f: &Fields, key: &str) -> Result<Option<(usize, usize)>> {
    let Some(v) = f.get(key) else { return Ok(None) };
    let bad = || f.value_error(key, v, "expected a positive integer or a list of two");
    if let Some(n) = super::fields::integer(v.get_ref()) {
        return if n > 0 {
            Ok(Some((n as usize, n as usize)))
        } else {
            Err(bad())
        };
    }
    let items = v
        .get_ref()
        .as_array()
        .filter(|a| a.len() == 2)
        .ok_or_else(bad)?;
    let a = super::fields::integer(items[0].get_ref())
        .filter(|n| *n > 0)
        .ok_or_else(bad)?;
    let b = super::fields::integer(items[1].get_ref())
        .filter(|n| *n > 0)
        .ok_or_else(bad)?;
    Ok(Some((a as usize, b as usize)))
}

/// Keras' `data_format`: `"channels_last"` (the default) or `"channels_first"`, which runs the
/// layer inside [`crate::layers::ChannelsFirst`].
fn channels_first(f: &Fields) -> Result<bool> {
    match f.str("data_format")? {
        None | Some("channels_last") => Ok(false),
        Some("channels_first") => Ok(true),
        Some(other) => Err(f.error(format!(
            "`data_format = \"{other}\"` is not a data format: use \"channels_last\" or \"channels_first\""
        ))),
    }
}

fn padding(f: &Fields) -> Result<Padding> {
    match f.get("padding") {
        None => Ok(Padding::Valid),
        Some(v) => v
            .get_ref()
            .as_str()
            .unwrap_or("")
            .parse()
            .map_err(|e| f.value_error("padding", v, e)),
    }
}

fn activation(f: &Fields) -> Result<Activation> {
    match f.get("activation") {
        None => Ok(Activation::Linear),
        Some(v) => {
            let name = v
                .get_ref()
                .as_str()
                .ok_or_else(|| f.value_error("activation", v, "expected a string"))?;
            name.parse().map_err(|e| f.value_error("activation", v, e))
        }
    }
}

/// One axis of a layer's input as Keras counts it (the batch is axis 0; negative from the
/// end), checked against the input's rank: the batch axis and axes past the rank are errors
/// naming the key.
fn feature_axis(l: &Fields, key: &str, v: &Value, inputs: &[&SymbolicTensor]) -> Result<isize> {
    let rank = inputs.first().map_or(1, |x| x.shape().len() + 1) as i64;
    let a = super::fields::integer(v.get_ref()).ok_or_else(|| {
        l.value_error(
            key,
            v,
            format!("expected an integer axis, got {}", v.get_ref().type_str()),
        )
    })?;
    let resolved = if a < 0 { a + rank } else { a };
    if !(1..rank).contains(&resolved) {
        return Err(l.value_error(
            key,
            v,
            format!(
                "axis {a} is not a feature axis of an input of rank {rank} (counting the batch \
                 as axis 0): use 1 to {} or -1 to -{}",
                rank - 1,
                rank - 1
            ),
        ));
    }
    Ok(a as isize)
}

/// LayerNormalization's `axes`: one axis or a list of distinct ones (default `-1`).
fn feature_axes(l: &Fields, key: &str, inputs: &[&SymbolicTensor]) -> Result<Vec<isize>> {
    let Some(v) = l.get(key) else {
        return Ok(vec![-1]);
    };
    let items: Vec<&Value> = match v.get_ref().as_array() {
        Some(a) if a.is_empty() => {
            return Err(l.value_error(key, v, "expected one axis or a non-empty list of axes"))
        }
        Some(a) => a.iter().collect(),
        None => vec![v],
    };
    let rank = inputs.first().map_or(1, |x| x.shape().len() + 1) as isize;
    let mut axes: Vec<isize> = Vec::new();
    for item in items {
        let a = feature_axis(l, key, item, inputs)?;
        let resolved = if a < 0 { a + rank } else { a };
        if axes
            .iter()
            .any(|&b| (if b < 0 { b + rank } else { b }) == resolved)
        {
            return Err(l.value_error(key, item, format!("axis {a} is given twice")));
        }
        axes.push(a);
    }
    Ok(axes)
}

/// Conv1D/Conv2D `groups` (default 1): at least 1, dividing the filters and the input's
/// channels (the last axis).
fn conv_groups(l: &Fields, filters: usize, inputs: &[&SymbolicTensor]) -> Result<usize> {
    let groups = l.usize_min_or("groups", 1, 1)?;
    let channels = inputs.first().and_then(|x| x.shape().last().copied());
    if let Some(v) = l.get("groups") {
        if !filters.is_multiple_of(groups) {
            return Err(l.value_error(
                "groups",
                v,
                format!("{groups} groups do not divide the {filters} filters"),
            ));
        }
        if let Some(c) = channels.filter(|c| !c.is_multiple_of(groups)) {
            return Err(l.value_error(
                "groups",
                v,
                format!("{groups} groups do not divide the input's {c} channels"),
            ));
        }
    }
    Ok(groups)
}

/// Builds the model of the `[model]` section; input shapes default to the data's. A
/// `standardize` layer (from `[data] standardize = true`) is applied to the input first, and the
/// layers see its output under the input's name.
/// A section `keras = "model.keras"` takes the model from a Keras file (relative to `base`).
pub(crate) fn model(
    f: &Fields,
    data_input_shape: &[usize],
    seed: u64,
    standardize: Option<Normalization>,
    base: &std::path::Path,
) -> Result<Model> {
    if let Some(file) = f.str("keras")? {
        f.finish()?;
        if standardize.is_some() {
            return Err(f.error(
                "`[data] standardize` cannot be added to a model from a Keras file: put a \
                 Normalization layer in the Keras model, or leave standardize out",
            ));
        }
        return crate::keras::load(base.join(file), false).map_err(|e| f.error(e));
    }
    let mut tensors: HashMap<String, SymbolicTensor> = HashMap::new();
    let mut inputs = Vec::new();
    let input_tables = f.tables("inputs")?;
    if input_tables.is_empty() {
        if data_input_shape.is_empty() {
            return Err(f.error(
                "no `inputs` and no [data] to take their shape from: add inputs = [{ name = \"x\", shape = [...] }]",
            ));
        }
        let x = Input::named("input", data_input_shape.to_vec());
        tensors.insert("input".into(), x.clone());
        inputs.push(("input".to_string(), x));
    }
    for t in &input_tables {
        let name = t.required_str("name")?.to_string();
        let shape = t
            .usizes("shape")?
            .unwrap_or_else(|| data_input_shape.to_vec());
        t.finish()?;
        let x = Input::named(name.clone(), shape);
        tensors.insert(name.clone(), x.clone());
        inputs.push((name, x));
    }
    let mut last = inputs
        .last()
        .map(|(_, x)| x.clone())
        .ok_or_else(|| f.error("no inputs"))?;
    if let Some(layer) = standardize {
        let [(name, x)] = inputs.as_slice() else {
            return Err(f.error(format!(
                "[data] standardize = true standardizes one input, but the model has {}",
                inputs.len()
            )));
        };
        last = layer.apply(x).map_err(|e| f.error(e))?;
        tensors.insert(name.clone(), last.clone());
    }
    let layers = f.tables("layers")?;
    if layers.is_empty() {
        return Err(f.error("`layers` is empty: describe at least one layer"));
    }
    // Layers with `trainable = false` (Keras' `layer.trainable = False`), frozen once built.
    let mut frozen = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let kind = l.required_str("type")?;
        let name = match l.str("name")? {
            Some(n) if n.trim().is_empty() => {
                let v = l.get("name").expect("read above");
                return Err(l.value_error("name", v, "a layer name must not be empty"));
            }
            Some(n) => n.to_string(),
            None => format!("{kind}_{i}"),
        };
        if !l.bool_or("trainable", true)? {
            frozen.push(name.clone());
        }
        let sources = l.strings("input")?.unwrap_or_default();
        let layer_inputs: Vec<SymbolicTensor> = if sources.is_empty() {
            vec![last.clone()]
        } else {
            sources
                .iter()
                .map(|s| {
                    tensors.get(s).cloned().ok_or_else(|| {
                        l.error(format!("input `{s}` is not an input or an earlier layer"))
                    })
                })
                .collect::<Result<_>>()?
        };
        let refs: Vec<&SymbolicTensor> = layer_inputs.iter().collect();
        let applied = match kind {
            "dense" => {
                let units = l
                    .usize_min("units", 1)?
                    .ok_or_else(|| l.error("dense needs `units`"))?;
                let d = Dense::new(units)
                    .activation(activation(l)?)
                    .use_bias(l.bool_or("use_bias", true)?)
                    .with_name(name.clone());
                let d = with_regularizers!(d, l);
                with_constraints!(d, l).apply_many(&refs)
            }
            "conv1d" | "conv2d" => {
                let filters = l
                    .usize_min("filters", 1)?
                    .ok_or_else(|| l.error(format!("{kind} needs `filters`")))?;
                let kernel = size_pair(l, "kernel_size")?
                    .ok_or_else(|| l.error(format!("{kind} needs `kernel_size`")))?;
                let padding = padding(l)?;
                let dilation = l.usize_min_or("dilation_rate", 1, 1)?;
                let strides = size_pair(l, "strides")?.unwrap_or((1, 1));
                let first = channels_first(l)?;
                macro_rules! common {
                    ($c:expr) => {{
                        let c = $c
                            .padding(padding)
                            .activation(activation(l)?)
                            .use_bias(l.bool_or("use_bias", true)?)
                            .with_name(name.clone());
                        let c = with_regularizers!(c, l);
                        in_format(with_constraints!(c, l), first).apply_many(&refs)
                    }};
                }
                let groups = conv_groups(l, filters, &refs)?;
                if kind == "conv1d" {
                    common!(Conv1D::new(filters, kernel.0)
                        .strides(strides.0)
                        .dilation_rate(dilation)
                        .groups(groups))
                } else {
                    common!(Conv2D::new(filters, kernel)
                        .strides(strides)
                        .dilation_rate(dilation)
                        .groups(groups))
                }
            }
            "max_pooling1d" | "average_pooling1d" => {
                let size = l.usize_min_or("pool_size", 2, 1)?;
                let strides = l.usize_min_or("strides", size, 1)?;
                let pad = padding(l)?;
                let first = channels_first(l)?;
                if kind == "max_pooling1d" {
                    in_format(
                        MaxPooling1D::new(size)
                            .strides(strides)
                            .padding(pad)
                            .with_name(name.clone()),
                        first,
                    )
                    .apply_many(&refs)
                } else {
                    in_format(
                        AveragePooling1D::new(size)
                            .strides(strides)
                            .padding(pad)
                            .with_name(name.clone()),
                        first,
                    )
                    .apply_many(&refs)
                }
            }
            "max_pooling2d" | "average_pooling2d" => {
                let size = size_pair(l, "pool_size")?.unwrap_or((2, 2));
                let strides = size_pair(l, "strides")?.unwrap_or(size);
                let pad = padding(l)?;
                let first = channels_first(l)?;
                if kind == "max_pooling2d" {
                    in_format(
                        MaxPooling2D::new(size)
                            .strides(strides)
                            .padding(pad)
                            .with_name(name.clone()),
                        first,
                    )
                    .apply_many(&refs)
                } else {
                    in_format(
                        AveragePooling2D::new(size)
                            .strides(strides)
                            .padding(pad)
                            .with_name(name.clone()),
                        first,
                    )
                    .apply_many(&refs)
                }
            }
            "global_average_pooling1d" => in_format(
                GlobalAveragePooling1D::new().with_name(name.clone()),
                channels_first(l)?,
            )
            .apply_many(&refs),
            "global_average_pooling2d" => in_format(
                GlobalAveragePooling2D::new().with_name(name.clone()),
                channels_first(l)?,
            )
            .apply_many(&refs),
            "global_max_pooling1d" => in_format(
                GlobalMaxPooling1D::new().with_name(name.clone()),
                channels_first(l)?,
            )
            .apply_many(&refs),
            "global_max_pooling2d" => in_format(
                GlobalMaxPooling2D::new().with_name(name.clone()),
                channels_first(l)?,
            )
            .apply_many(&refs),
            "batch_normalization" => BatchNormalization::new()
                .axis(match l.get("axis") {
                    Some(v) => feature_axis(l, "axis", v, &refs)?,
                    None => -1,
                })
                .momentum(l.f64_in_or("momentum", 0.99, Bounds::closed(0.0, 1.0))?)
                .epsilon(l.f64_in_or("epsilon", 1e-3, Bounds::positive())?)
                .center(l.bool_or("center", true)?)
                .scale(l.bool_or("scale", true)?)
                .synchronized(l.bool_or("synchronized", false)?)
                .with_name(name.clone())
                .apply_many(&refs),
            "layer_normalization" => LayerNormalization::new()
                .axes(&feature_axes(l, "axes", &refs)?)
                .epsilon(l.f64_in_or("epsilon", 1e-3, Bounds::positive())?)
                .center(l.bool_or("center", true)?)
                .scale(l.bool_or("scale", true)?)
                .with_name(name.clone())
                .apply_many(&refs),
            "embedding" => {
                let input_dim = l
                    .usize_min("input_dim", 1)?
                    .ok_or_else(|| l.error("embedding needs `input_dim`"))?;
                let output_dim = l
                    .usize_min("output_dim", 1)?
                    .ok_or_else(|| l.error("embedding needs `output_dim`"))?;
                Embedding::new(input_dim, output_dim)
                    .mask_zero(l.bool_or("mask_zero", false)?)
                    .with_name(name.clone())
                    .apply_many(&refs)
            }
            "masking" => Masking::new(l.f64_or("mask_value", 0.0)?)
                .with_name(name.clone())
                .apply_many(&refs),
            "lstm" => {
                let units = l
                    .usize_min("units", 1)?
                    .ok_or_else(|| l.error("lstm needs `units`"))?;
                Lstm::new(units)
                    .return_sequences(l.bool_or("return_sequences", false)?)
                    .dropout(l.f64_in_or("dropout", 0.0, Bounds::closed_open(0.0, 1.0))?)
                    .recurrent_dropout(l.f64_in_or(
                        "recurrent_dropout",
                        0.0,
                        Bounds::closed_open(0.0, 1.0),
                    )?)
                    .with_name(name.clone())
                    .apply_many(&refs)
            }
            "gru" => {
                let units = l
                    .usize_min("units", 1)?
                    .ok_or_else(|| l.error("gru needs `units`"))?;
                Gru::new(units)
                    .return_sequences(l.bool_or("return_sequences", false)?)
                    .dropout(l.f64_in_or("dropout", 0.0, Bounds::closed_open(0.0, 1.0))?)
                    .recurrent_dropout(l.f64_in_or(
                        "recurrent_dropout",
                        0.0,
                        Bounds::closed_open(0.0, 1.0),
                    )?)
                    .reset_after(l.bool_or("reset_after", true)?)
                    .with_name(name.clone())
                    .apply_many(&refs)
            }
            "reshape" => {
                let v = l
                    .get("target_shape")
                    .ok_or_else(|| l.error("reshape needs `target_shape`"))?;
                let items = v.get_ref().as_array().ok_or_else(|| {
                    l.value_error("target_shape", v, "expected a list of integers")
                })?;
                let shape = items
                    .iter()
                    .map(|i| {
                        super::fields::integer(i.get_ref())
                            .map(|n| n as isize)
                            .ok_or_else(|| l.value_error("target_shape", i, "expected an integer"))
                    })
                    .collect::<Result<Vec<isize>>>()?;
                Reshape::new(shape)
                    .with_name(name.clone())
                    .apply_many(&refs)
            }
            "concatenate" => {
                let axis = l
                    .get("axis")
                    .map(|v| {
                        super::fields::integer(v.get_ref())
                            .ok_or_else(|| l.value_error("axis", v, "expected an integer"))
                    })
                    .transpose()?;
                let c = Concatenate::new().with_name(name.clone());
                match axis {
                    Some(a) => c.axis(a as isize).apply_many(&refs),
                    None => c.apply_many(&refs),
                }
            }
            "add" => Add::new().with_name(name.clone()).apply_many(&refs),
            "multiply" => Multiply::new().with_name(name.clone()).apply_many(&refs),
            "dropout" => Dropout::new(l.f64_in_or("rate", 0.5, Bounds::closed_open(0.0, 1.0))?)
                .with_name(name.clone())
                .apply_many(&refs),
            "activation" => ActivationLayer::new(activation(l)?)
                .with_name(name.clone())
                .apply_many(&refs),
            "flatten" => in_format(Flatten::new().with_name(name.clone()), channels_first(l)?)
                .apply_many(&refs),
            other => {
                return Err(l.error(format!(
                    "unknown layer type `{other}`: use one of {LAYER_TYPES:?}"
                )))
            }
        }
        .map_err(|e| l.error(e))?;
        l.finish()?;
        tensors.insert(name, applied.clone());
        last = applied;
    }
    let output_names = f.strings("outputs")?;
    let outputs: Vec<SymbolicTensor> = match &output_names {
        None => vec![last],
        Some(names) => names
            .iter()
            .map(|n| {
                tensors
                    .get(n)
                    .cloned()
                    .ok_or_else(|| f.error(format!("output `{n}` is not a layer name")))
            })
            .collect::<Result<_>>()?,
    };
    f.finish()?;
    let inputs: Vec<SymbolicTensor> = inputs.into_iter().map(|(_, x)| x).collect();
    let mut model = Model::builder(&inputs, &outputs)
        .seed(seed)
        .build()
        .map_err(|e| f.error(e))?;
    for name in &frozen {
        model.set_trainable(name, false).map_err(|e| f.error(e))?;
    }
    Ok(model)
}

fn optimizer(f: &Fields) -> Result<Box<dyn Optimizer>> {
    let kind = f.str("type")?.unwrap_or("rmsprop");
    // `learning_rate` is a number or a schedule table (`{ type = "exponential_decay", … }`).
    let schedule = match f.get("learning_rate") {
        Some(v) if v.get_ref().is_table() => Some(schedule(
            &f.table("learning_rate")?.expect("a table, checked above"),
        )?),
        _ => None,
    };
    let lr = match &schedule {
        Some(s) => Some(s.rate(0)),
        None => f.f64_in("learning_rate", Bounds::positive())?,
    };
    // Keras: the decay rates of the moment estimates lie in [0, 1).
    let unit = Bounds::closed_open(0.0, 1.0);
    macro_rules! clipped {
        ($opt:expr) => {{
            let mut o = $opt;
            if let Some(c) = f.f64_in("clipnorm", Bounds::positive())? {
                o = o.clipnorm(c);
            }
            if let Some(c) = f.f64_in("global_clipnorm", Bounds::positive())? {
                o = o.global_clipnorm(c);
            }
            if let Some(c) = f.f64_in("clipvalue", Bounds::positive())? {
                o = o.clipvalue(c);
            }
            Box::new(o) as Box<dyn Optimizer>
        }};
    }
    if f.get("exclude_from_weight_decay").is_some() {
        return Err(f.error(
            "`exclude_from_weight_decay` is not supported: kiln applies weight decay to every \
             trainable variable; remove the key (and `weight_decay`, or decay all variables)",
        ));
    }
    for refused in [
        "use_ema",
        "loss_scale_factor",
        "gradient_accumulation_steps",
    ] {
        if f.get(refused).is_some() {
            return Err(f.error(format!(
                "`{refused}` is not supported: kiln has no EMA weights, loss scaling or \
                 gradient accumulation; remove the key"
            )));
        }
    }
    // Keras' `weight_decay` (decoupled: `var -= var·wd·lr` before each update) on every
    // optimizer; AdamW always has one.
    let wd = if kind == "adamw" {
        None
    } else {
        f.f64_in("weight_decay", Bounds::non_negative())?
    };
    macro_rules! decayed {
        ($opt:expr) => {{
            let o = $opt;
            match wd {
                Some(w) => clipped!(o.weight_decay(w)),
                None => clipped!(o),
            }
        }};
    }
    let opt = match kind {
        "sgd" => decayed!(Sgd::new(lr.unwrap_or(0.01))
            // Keras: "`momentum` must be a float between [0, 1]".
            .momentum(f.f64_in_or("momentum", 0.0, Bounds::closed(0.0, 1.0))?)
            .nesterov(f.bool_or("nesterov", false)?)),
        "adam" => decayed!(Adam::new(lr.unwrap_or(1e-3))
            .beta_1(f.f64_in_or("beta_1", 0.9, unit)?)
            .beta_2(f.f64_in_or("beta_2", 0.999, unit)?)
            .epsilon(f.f64_in_or("epsilon", 1e-7, Bounds::positive())?)
            .amsgrad(f.bool_or("amsgrad", false)?)),
        "adamw" => clipped!(AdamW::new(lr.unwrap_or(1e-3))
            .weight_decay(f.f64_in_or("weight_decay", 0.004, Bounds::non_negative())?)
            .beta_1(f.f64_in_or("beta_1", 0.9, unit)?)
            .beta_2(f.f64_in_or("beta_2", 0.999, unit)?)
            .epsilon(f.f64_in_or("epsilon", 1e-7, Bounds::positive())?)
            .amsgrad(f.bool_or("amsgrad", false)?)),
        "rmsprop" => decayed!(RmsProp::new(lr.unwrap_or(1e-3))
            .rho(f.f64_in_or("rho", 0.9, unit)?)
            .momentum(f.f64_in_or("momentum", 0.0, unit)?)
            .epsilon(f.f64_in_or("epsilon", 1e-7, Bounds::positive())?)
            .centered(f.bool_or("centered", false)?)),
        "nadam" => decayed!(Nadam::new(lr.unwrap_or(1e-3))
            .beta_1(f.f64_in_or("beta_1", 0.9, unit)?)
            .beta_2(f.f64_in_or("beta_2", 0.999, unit)?)
            .epsilon(f.f64_in_or("epsilon", 1e-7, Bounds::positive())?)),
        "adamax" => decayed!(Adamax::new(lr.unwrap_or(1e-3))
            .beta_1(f.f64_in_or("beta_1", 0.9, unit)?)
            .beta_2(f.f64_in_or("beta_2", 0.999, unit)?)
            .epsilon(f.f64_in_or("epsilon", 1e-7, Bounds::positive())?)),
        "adagrad" => decayed!(Adagrad::new(lr.unwrap_or(1e-3))
            .initial_accumulator_value(f.f64_in_or(
                "initial_accumulator_value",
                0.1,
                Bounds::non_negative()
            )?)
            .epsilon(f.f64_in_or("epsilon", 1e-7, Bounds::positive())?)),
        "adadelta" => decayed!(Adadelta::new(lr.unwrap_or(1e-3))
            .rho(f.f64_in_or("rho", 0.95, Bounds::closed(0.0, 1.0))?)
            .epsilon(f.f64_in_or("epsilon", 1e-7, Bounds::positive())?)),
        "lion" => decayed!(Lion::new(lr.unwrap_or(1e-3))
            // Keras: beta_1 in (0, 1]; 0 "degenerates to SignSGD".
            .beta_1(f.f64_in_or(
                "beta_1",
                0.9,
                Bounds {
                    lo_inclusive: false,
                    ..Bounds::closed(0.0, 1.0)
                }
            )?)
            .beta_2(f.f64_in_or("beta_2", 0.99, Bounds::closed(0.0, 1.0))?)),
        other => {
            return Err(f.error(format!(
                "unknown optimizer `{other}`: use sgd, adam, adamw, rmsprop, nadam, adamax, \
                 adagrad, adadelta or lion"
            )))
        }
    };
    f.finish()?;
    Ok(match schedule {
        Some(s) => Box::new(crate::optimizers::Scheduled::new(opt, s)),
        None => opt,
    })
}

/// A learning-rate schedule table: `type` (Keras' class in snake case) and the class's
/// parameters by Keras' names, the optional ones with Keras' defaults; unknown keys are errors.
fn schedule(t: &Fields) -> Result<LearningRateSchedule> {
    let kind = t.required_str("type")?;
    let req = |k: &str| -> Result<f64> {
        t.f64(k)?
            .ok_or_else(|| t.error(format!("missing key `{k}` (a {kind} schedule needs it)")))
    };
    let steps = |k: &str| -> Result<f64> {
        t.f64_in(k, Bounds::positive())?
            .ok_or_else(|| t.error(format!("missing key `{k}` (a {kind} schedule needs it)")))
    };
    let numbers = |k: &str| -> Result<Vec<f64>> {
        let v = t
            .get(k)
            .ok_or_else(|| t.error(format!("missing key `{k}` (a {kind} schedule needs it)")))?;
        let items = v
            .get_ref()
            .as_array()
            .ok_or_else(|| t.value_error(k, v, "expected a list of numbers"))?;
        items
            .iter()
            .map(|i| {
                super::fields::number(i.get_ref())
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| t.value_error(k, i, "expected a finite number"))
            })
            .collect()
    };
    let s = match kind {
        "exponential_decay" => LearningRateSchedule::ExponentialDecay {
            initial_learning_rate: req("initial_learning_rate")?,
            decay_steps: steps("decay_steps")?,
            decay_rate: req("decay_rate")?,
            staircase: t.bool_or("staircase", false)?,
        },
        "piecewise_constant_decay" => LearningRateSchedule::PiecewiseConstantDecay {
            boundaries: numbers("boundaries")?,
            values: numbers("values")?,
        },
        "polynomial_decay" => LearningRateSchedule::PolynomialDecay {
            initial_learning_rate: req("initial_learning_rate")?,
            decay_steps: steps("decay_steps")?,
            end_learning_rate: t.f64_or("end_learning_rate", 0.0001)?,
            power: t.f64_or("power", 1.0)?,
            cycle: t.bool_or("cycle", false)?,
        },
        "inverse_time_decay" => LearningRateSchedule::InverseTimeDecay {
            initial_learning_rate: req("initial_learning_rate")?,
            decay_steps: steps("decay_steps")?,
            decay_rate: req("decay_rate")?,
            staircase: t.bool_or("staircase", false)?,
        },
        "cosine_decay" => LearningRateSchedule::CosineDecay {
            initial_learning_rate: req("initial_learning_rate")?,
            decay_steps: steps("decay_steps")?,
            alpha: t.f64_or("alpha", 0.0)?,
            warmup_target: t.f64("warmup_target")?,
            warmup_steps: t.f64_in_or("warmup_steps", 0.0, Bounds::non_negative())?,
        },
        "cosine_decay_restarts" => LearningRateSchedule::CosineDecayRestarts {
            initial_learning_rate: req("initial_learning_rate")?,
            first_decay_steps: steps("first_decay_steps")?,
            t_mul: t.f64_in_or("t_mul", 2.0, Bounds::positive())?,
            m_mul: t.f64_or("m_mul", 1.0)?,
            alpha: t.f64_or("alpha", 0.0)?,
        },
        other => {
            return Err(t.error(format!(
                "unknown learning rate schedule `{other}`: use exponential_decay, \
                 piecewise_constant_decay, polynomial_decay, inverse_time_decay, cosine_decay or \
                 cosine_decay_restarts"
            )))
        }
    };
    t.finish()?;
    s.validate().map_err(|e| t.error(e))?;
    Ok(s)
}

/// A loss from a string (`"mse"`) or a table (`{ type = "huber", delta = 0.5 }`).
fn loss(f: &Fields, key: &str) -> Result<LossSpec> {
    let v = f.get(key).expect("caller checked the key");
    if let Some(name) = v.get_ref().as_str() {
        crate::losses::by_name(name).map_err(|e| f.value_error(key, v, e))?;
        return Ok(LossSpec::Named(name.to_string()));
    }
    if !v.get_ref().is_table() {
        return Err(f.value_error(key, v, "expected a loss name or a table"));
    }
    let t = f.table(key)?.expect("a table, checked above");
    let kind = t
        .str("type")?
        .ok_or_else(|| f.value_error(key, v, "a loss table needs `type`"))?;
    let reduction = match t.get("reduction") {
        None => Reduction::default(),
        Some(r) => r
            .get_ref()
            .as_str()
            .ok_or_else(|| t.value_error("reduction", r, "expected a string"))?
            .parse()
            .map_err(|e| t.value_error("reduction", r, e))?,
    };
    if crate::losses::keras_class_name(kind).is_none() {
        let tv = t.get("type").expect("read above");
        return Err(t.value_error(
            "type",
            tv,
            format!("unknown loss `{kind}` (`kiln losses` lists them all)"),
        ));
    }
    let params = TableParams {
        fields: &t,
        skip: &["type", "reduction"],
    };
    let built = crate::losses::config::loss_from_config(kind, &params, reduction)?;
    t.finish()?;
    Ok(LossSpec::Loss(built))
}

/// `[compile] metrics` (or `weighted_metrics`): a name, a table, or a list of them for every
/// output, or a table of output = that. A table names the metric with `name`, takes Keras'
/// parameters, and `as` renames it in the logs:
/// `metrics = ["accuracy", { name = "auc", curve = "PR", as = "pr_auc" }]`.
fn metrics(
    f: &Fields,
    key: &str,
    output_names: &[String],
) -> Result<Vec<(Option<String>, MetricSpec)>> {
    let Some(v) = f.get(key) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    if v.get_ref().is_table()
        && !v
            .get_ref()
            .as_table()
            .is_some_and(|t| t.contains_key("name"))
    {
        let t = f.table(key)?.expect("a table, checked above");
        for (output, item) in t.entries() {
            if !output_names.contains(&output) {
                return Err(t.value_error(
                    &output,
                    item,
                    format!("`{output}` is not an output; outputs are {output_names:?}"),
                ));
            }
            for m in metric_items(&t, &output, item)? {
                out.push((Some(output.clone()), m));
            }
        }
    } else {
        out.extend(metric_items(f, key, v)?.into_iter().map(|m| (None, m)));
    }
    Ok(out)
}

/// One metric entry, or a list of them, under `key` of `f`.
fn metric_items(f: &Fields, key: &str, v: &super::fields::Value<'_>) -> Result<Vec<MetricSpec>> {
    let one = |item: &super::fields::Value<'_>, what: String| -> Result<MetricSpec> {
        if let Some(name) = item.get_ref().as_str() {
            crate::metrics::config::metric_by_name(name)
                .map_err(|e| f.error_at(key, &item.span(), strip_kind(e)))?;
            // By name, so that a Keras export writes the name the run file gave.
            return Ok(MetricSpec::Named(name.to_string()));
        }
        let Some(table) = item.get_ref().as_table() else {
            return Err(f.value_error(
                key,
                item,
                "expected a metric name or a table with `name` (and the metric's parameters)",
            ));
        };
        let t = Fields::new(f.doc, table, item.span(), what);
        let name = t
            .str("name")?
            .ok_or_else(|| t.error("a metric table needs `name` (a Keras metric name)"))?;
        let rename = t.str("as")?;
        if rename == Some("") {
            return Err(t.value_error("as", t.get("as").expect("read above"), "must not be empty"));
        }
        let params = TableParams {
            fields: &t,
            skip: &["name", "as"],
        };
        let mut m = crate::metrics::config::metric_from_config(name, &params).map_err(|e| {
            match crate::metrics::config::METRICS
                .iter()
                .any(|(n, _)| *n == name)
            {
                true => e,
                false => t.value_error("name", t.get("name").expect("read above"), strip_kind(e)),
            }
        })?;
        // Unknown keys were refused by the metric's own parser (`only`), naming the line.
        if let Some(r) = rename {
            m = crate::metrics::renamed(m, r);
        }
        Ok(MetricSpec::from(m))
    };
    match v.get_ref().as_array() {
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(n, i)| one(i, format!("{} `{key}`[{n}]", f.what)))
            .collect(),
        None => Ok(vec![one(v, format!("{} `{key}`", f.what))?]),
    }
}

/// An error's message without its kind prefix, to be placed at a line of the run file.
fn strip_kind(e: crate::Error) -> String {
    match e {
        crate::Error::InvalidArgument(m) => m,
        other => other.to_string(),
    }
}

/// The `[compile]` section; `keras = true` takes the compile configuration of the Keras file
/// the model came from.
pub(crate) fn compile(f: &Fields, model: &Model) -> Result<Compile> {
    let output_names = model.output_names();
    let rule = probability_rule(f)?;
    if f.has("keras") {
        let from_keras = f.bool_or("keras", false)?;
        f.finish()?;
        if !from_keras {
            return Err(f.error("`keras = false` says nothing: give the compile options instead"));
        }
        let c = crate::keras::compile_config_of(model).map_err(|e| f.error(e))?;
        // The file's rule (Keras 2's for a Keras 2 file) unless the run file names one.
        return Ok(match rule {
            Some(r) => c.probability_rule(r),
            None => c,
        });
    }
    let opt = match f.get("optimizer") {
        None => optimizer(&Fields::new(
            f.doc,
            &Default::default(),
            f.span.clone(),
            "[compile] optimizer",
        ))?,
        Some(v) if v.get_ref().is_str() => {
            let name = v.get_ref().as_str().unwrap_or_default();
            let mut t = toml::de::DeTable::default();
            t.insert(
                toml::Spanned::new(v.span(), "type".into()),
                toml::Spanned::new(v.span(), toml::de::DeValue::String(name.to_string().into())),
            );
            let fields = Fields::new(f.doc, &t, v.span(), "[compile] optimizer");
            optimizer(&fields)?
        }
        Some(_) => optimizer(&f.table("optimizer")?.expect("present"))?,
    };
    let mut c = Compile::from_boxed(opt).probability_rule(rule.unwrap_or_default());
    if f.has("loss") {
        c = c.loss(loss(f, "loss")?);
    }
    if let Some(per_output) = f.table("losses")? {
        for (name, _) in per_output.entries() {
            if !output_names.contains(&name) {
                return Err(per_output.error(format!(
                    "`{name}` is not an output; outputs are {output_names:?}"
                )));
            }
            c = c.loss_for(name.clone(), loss(&per_output, &name)?);
        }
    }
    match f.get("loss_weights") {
        None => {}
        Some(v) => {
            if super::fields::number(v.get_ref()).is_some() {
                let w = f.f64("loss_weights")?.expect("present");
                c = c.loss_weight(w);
            } else if let Some(t) = f.table("loss_weights")? {
                for (name, _) in t.entries() {
                    let w = t.f64(&name)?.expect("present");
                    c = c.loss_weight_for(name, w);
                }
            } else {
                return Err(f.value_error(
                    "loss_weights",
                    v,
                    "expected a number or a table of output = weight",
                ));
            }
        }
    }
    match f.get("loss_weighting") {
        None => {}
        Some(v) if v.get_ref().is_str() => {
            let name = v.get_ref().as_str().unwrap_or_default();
            let mut t = toml::de::DeTable::default();
            t.insert(
                toml::Spanned::new(v.span(), "type".into()),
                toml::Spanned::new(v.span(), toml::de::DeValue::String(name.to_string().into())),
            );
            let fields = Fields::new(f.doc, &t, v.span(), "[compile] loss_weighting");
            c = loss_weighting(&fields, c)?;
        }
        Some(_) => c = loss_weighting(&f.table("loss_weighting")?.expect("present"), c)?,
    }
    for key in ["metrics", "weighted_metrics"] {
        for (output, metric) in metrics(f, key, output_names)? {
            c = match (output, key == "weighted_metrics") {
                (None, false) => c.metric(metric),
                (None, true) => c.weighted_metric(metric),
                (Some(o), false) => c.metric_for(o, metric),
                (Some(o), true) => c.weighted_metric_for(o, metric),
            };
        }
    }
    f.finish()?;
    Ok(c)
}

/// `loss_weighting = "dwa"` or `{ type = "…", …, added_terms = true }` of `[compile]`.
fn loss_weighting(f: &Fields, c: Compile) -> Result<Compile> {
    use crate::loss_weighting::{
        DynamicWeightAverage, Famo, GradNorm, PCGrad, Strategy, Uncertainty,
    };
    let kind = f.required_str("type")?;
    let added = f.bool_or("added_terms", false)?;
    let strategy: Box<dyn Strategy> = match kind {
        "uncertainty" => {
            Box::new(Uncertainty::new().initial_log_var(f.f64_or("initial_log_var", 0.0)?))
        }
        "dwa" => Box::new(DynamicWeightAverage::new().temperature(f.f64_in_or(
            "temperature",
            2.0,
            Bounds::positive(),
        )?)),
        "famo" => Box::new(
            Famo::new()
                .learning_rate(f.f64_in_or("learning_rate", 0.025, Bounds::positive())?)
                .gamma(f.f64_in_or("gamma", 1e-5, Bounds::non_negative())?),
        ),
        "pcgrad" => Box::new(PCGrad::new().shuffle(f.bool_or("shuffle", true)?)),
        "gradnorm" => {
            let mut g = GradNorm::new().alpha(f.f64_in_or("alpha", 1.5, Bounds::non_negative())?);
            if let Some(lr) = f.f64_in("learning_rate", Bounds::positive())? {
                g = g.learning_rate(lr);
            }
            if let Some(layer) = f.str("layer")? {
                g = g.layer(layer);
            }
            Box::new(g)
        }
        other => {
            return Err(f.error(format!(
                "unknown loss weighting `{other}`: use {}",
                LOSS_WEIGHTINGS.join(", ")
            )))
        }
    };
    f.finish()?;
    strategy.validate().map_err(|e| f.error(e))?;
    Ok(c.loss_weighting_boxed(strategy).weight_added_terms(added))
}

/// The strategies a run file's `loss_weighting` names.
const LOSS_WEIGHTINGS: [&str; 5] = ["uncertainty", "dwa", "famo", "pcgrad", "gradnorm"];

/// `probability_rule = "clipped" | "logits"`: how crossentropies read softmax and sigmoid
/// outputs (see [`crate::ProbabilityRule`]).
fn probability_rule(f: &Fields) -> Result<Option<crate::ProbabilityRule>> {
    let Some(name) = f.str("probability_rule")? else {
        return Ok(None);
    };
    match name {
        "clipped" => Ok(Some(crate::ProbabilityRule::Clipped)),
        "logits" => Ok(Some(crate::ProbabilityRule::Logits)),
        other => Err(f.value_error(
            "probability_rule",
            f.get("probability_rule").expect("read above"),
            format!(
                "`{other}` is not a rule: use \"clipped\" (Keras 3 on JAX, the default) or \
                 \"logits\" (Keras 2: from the logits behind a final softmax or sigmoid)"
            ),
        )),
    }
}

/// One `[[added]]` term.
pub(crate) fn added(f: &Fields, model: &mut Model) -> Result<()> {
    let kind = f.required_str("kind")?;
    let default_name = if matches!(kind, "fgsm" | "pgd") {
        "adversarial"
    } else {
        kind
    };
    let name = f.str("name")?.unwrap_or(default_name).to_string();
    match kind {
        "fgsm" | "pgd" => {
            let eps = f
                .f64_in("epsilon", Bounds::positive())?
                .ok_or_else(|| f.error("adversarial terms need `epsilon`"))?;
            let mut a = if kind == "fgsm" {
                Adversarial::fgsm(eps)
            } else {
                Adversarial::pgd(
                    eps,
                    f.usize_min_or("steps", 10, 1)?,
                    f.f64_in_or("step_size", eps / 4.0, Bounds::positive())?,
                )
                .random_start(f.bool_or("random_start", false)?)
            };
            if let Some(norm) = f.str("norm")? {
                a = a.norm(match norm {
                    "infinity" | "sign" => PerturbationNorm::Infinity,
                    "l2" => PerturbationNorm::L2,
                    other => {
                        return Err(f.error(format!("unknown norm `{other}`: use infinity or l2")))
                    }
                });
            }
            if let Some(m) = f.f64("multiplier")? {
                a = a.multiplier(m);
            }
            if let Some(v) = f.get("clip") {
                let arr = v
                    .get_ref()
                    .as_array()
                    .filter(|a| a.len() == 2)
                    .ok_or_else(|| f.value_error("clip", v, "expected [min, max]"))?;
                let lo = super::fields::number(arr[0].get_ref())
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| f.value_error("clip", v, "expected finite numbers"))?;
                let hi = super::fields::number(arr[1].get_ref())
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| f.value_error("clip", v, "expected finite numbers"))?;
                if lo > hi {
                    return Err(f.value_error("clip", v, format!("min {lo} is above max {hi}")));
                }
                a = a.clip(lo, hi);
            }
            f.finish()?;
            model.add_loss_term(name, a).map_err(|e| f.error(e))
        }
        "mean_abs" | "mean_square" => {
            let of = f.required_str("of")?.to_string();
            let factor = f.f64_or("factor", 1e-3)?;
            f.finish()?;
            let exists = model.layer_names().iter().any(|l| *l == of);
            if !exists {
                return Err(f.error(format!("`of = \"{of}\"` is not a layer of the model")));
            }
            let square = kind == "mean_square";
            let handle = model.layer_output(&of).map_err(|e| f.error(e))?;
            model
                .add_loss(name, move |t: &Tensors| {
                    let h = t.get(&handle)?;
                    let v = if square {
                        h.sqr()?.mean_all()?
                    } else {
                        h.abs()?.mean_all()?
                    };
                    Ok((v * factor)?)
                })
                .map_err(|e| f.error(e))
        }
        other => Err(f.error(format!(
            "unknown added term `{other}`: use fgsm, pgd, mean_abs or mean_square"
        ))),
    }
}

/// The `[fit]` section (callbacks included, checkpoints excepted: the caller adds them).
pub(crate) fn fit(f: &Fields) -> Result<(Fit, Option<String>)> {
    let mut fit = Fit::new()
        .epochs(f.usize_or("epochs", 10)?)
        .batch_size(f.usize_min_or("batch_size", 32, 1)?)
        .shuffle(f.bool_or("shuffle", true)?)
        .gradient_diagnostics(f.bool_or("gradient_diagnostics", false)?)
        .validation_gradient_diagnostics(f.bool_or("validation_gradient_diagnostics", false)?)
        .validation_split(f.f64_in_or("validation_split", 0.0, Bounds::closed_open(0.0, 1.0))?);
    if let Some(t) = f.table("class_weight")? {
        let mut weights = Vec::new();
        for (k, v) in t.entries() {
            let class: usize = k
                .parse()
                .map_err(|_| t.value_error(&k, v, "class keys must be integers (\"0\" = 2.0)"))?;
            // A negative weight would reward mistakes on the class.
            let w = t.f64_in(&k, Bounds::non_negative())?.expect("present");
            weights.push((class, w));
        }
        fit = fit.class_weight(weights);
    }
    let mut best_monitor = None;
    for cb in f.tables("callbacks")? {
        let kind = cb.required_str("type")?;
        fit = match kind {
            "early_stopping" => fit.callback(
                callbacks::EarlyStopping::new(cb.str("monitor")?.unwrap_or("val_loss"))
                    .patience(cb.usize_or("patience", 0)?)
                    .min_delta(cb.f64_or("min_delta", 0.0)?)
                    .restore_best_weights(cb.bool_or("restore_best_weights", false)?),
            ),
            "reduce_lr_on_plateau" => fit.callback(
                callbacks::ReduceLROnPlateau::new(cb.str("monitor")?.unwrap_or("val_loss"))
                    // Keras: "ReduceLROnPlateau does not support a factor >= 1.0".
                    .factor(cb.f64_in_or("factor", 0.1, Bounds::open(0.0, 1.0))?)
                    .patience(cb.usize_or("patience", 10)?)
                    .min_delta(cb.f64_or("min_delta", 1e-4)?)
                    .cooldown(cb.usize_or("cooldown", 0)?)
                    .min_lr(cb.f64_in_or("min_lr", 0.0, Bounds::non_negative())?),
            ),
            "lr_schedule" => {
                let initial = cb.f64_in("initial", Bounds::positive())?.ok_or_else(|| cb.error("a schedule needs `initial`"))?;
                let schedule = match cb.str("schedule")?.unwrap_or("step") {
                    "step" => Schedule::Step { initial, factor: cb.f64_in_or("factor", 0.5, Bounds::positive())?, every: cb.usize_min_or("every", 10, 1)? },
                    "exponential" => Schedule::Exponential { initial, rate: cb.f64_in_or("rate", 0.9, Bounds::positive())?, decay_epochs: cb.f64_in_or("decay_epochs", 1.0, Bounds::positive())? },
                    "cosine" => Schedule::Cosine { initial, decay_epochs: cb.usize_min_or("decay_epochs", 10, 1)?, alpha: cb.f64_in_or("alpha", 0.0, Bounds::closed(0.0, 1.0))? },
                    other => return Err(cb.error(format!("unknown schedule `{other}`: use step, exponential or cosine"))),
                };
                fit.callback(callbacks::LearningRateScheduler::new(schedule))
            }
            "terminate_on_nan" => fit.callback(callbacks::TerminateOnNaN::default()),
            "model_checkpoint" => {
                best_monitor = Some(cb.str("monitor")?.unwrap_or("val_loss").to_string());
                fit
            }
            other => {
                return Err(cb.error(format!(
                    "unknown callback `{other}`: use early_stopping, reduce_lr_on_plateau, lr_schedule, terminate_on_nan or model_checkpoint"
                )))
            }
        };
        cb.finish()?;
    }
    f.finish()?;
    Ok((fit, best_monitor))
}
