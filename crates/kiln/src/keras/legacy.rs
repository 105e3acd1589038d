//! Legacy whole-model `.h5` files, as Keras 2 (`tf.keras`, `tf_keras`) and Keras 3's
//! `model.save("m.h5")` write them: the architecture in the root attribute `model_config`, the
//! compile configuration in `training_config`, and each top-level layer's weights in the group
//! `model_weights/<layer>`, listed by its `weight_names` attribute.
//!
//! The config is translated into the Keras 3 form the `.keras` reader takes (Keras 2 spellings:
//! `batch_input_shape`, nodes as `[[layer, node, tensor, kwargs]]`, `optimizer_config`,
//! `Custom>Adam`, metric objects, the `auto` reduction), so one strict reader checks both, and
//! an imported legacy model exports as a Keras 3 `.keras` file. Every read of the HDF5 file goes
//! through [`WeightsFile`]: hard links only, sizes checked before allocating.

use super::graph::LayerSlot;
use super::h5::WeightsFile;
use super::json::{error_at, short};
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};

/// What a legacy file gives: its config in the Keras 3 form (with `compile_config` when it was
/// compiled), the Keras version that wrote it, and the HDF5 file for the weights.
pub(crate) struct LegacyFile {
    pub(crate) config: Value,
    pub(crate) keras_version: Option<String>,
    pub(crate) weights: WeightsFile,
}

/// Reads the root attributes of a legacy `.h5` file and translates its config.
pub(crate) fn read(bytes: Vec<u8>, shown: &str) -> Result<LegacyFile> {
    let weights = WeightsFile::new(bytes, shown.to_string())?;
    let one = |name: &str| -> Result<Option<String>> {
        Ok(weights
            .attr_strings("", name)?
            .and_then(|v| v.into_iter().next()))
    };
    let text = one("model_config")?.ok_or_else(|| {
        Error::Data(format!(
            "{shown}: an HDF5 file without a `model_config` attribute: not a whole Keras model \
             (a file of weights only, from save_weights, has no architecture: build the model \
             and load the weights into it)"
        ))
    })?;
    let file = format!("{shown}: model_config");
    let model: Value =
        serde_json::from_str(&text).map_err(|e| Error::Data(format!("{file}: not JSON: {e}")))?;
    let mut config = translate_model(&model, "", &file)?;
    if let Some(text) = one("training_config")? {
        let tfile = format!("{shown}: training_config");
        let tc: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Data(format!("{tfile}: not JSON: {e}")))?;
        let cc = compile_config(&tc, &tfile)?;
        if let Some(o) = config.as_object_mut() {
            o.insert("compile_config".into(), cc);
        }
    }
    let keras_version = one("keras_version")?;
    Ok(LegacyFile {
        config,
        keras_version,
        weights,
    })
}

fn obj<'a>(v: &'a Value, file: &str, at: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| error_at(file, at, format!("expected an object, got {}", short(v))))
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// A model object (`{"class_name": "Functional"|"Model"|"Sequential", "config": …}`).
fn translate_model(v: &Value, at: &str, file: &str) -> Result<Value> {
    let mut m = obj(v, file, at)?.clone();
    let class = m
        .get("class_name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let cat = join(at, "config");
    let cfg = obj(
        m.get("config")
            .ok_or_else(|| error_at(file, at, "`config` is missing"))?,
        file,
        &cat,
    )?;
    let mut cfg = cfg.clone();
    let layers = cfg
        .get("layers")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| error_at(file, &cat, "`layers` is missing or not a list"))?;
    let lat = |i: usize| join(&cat, &format!("layers[{i}]"));
    let mut out: Vec<Value> = Vec::new();
    if class == "Sequential" {
        for (i, l) in layers.iter().enumerate() {
            let mut l = translate_layer(l, &lat(i), file)?;
            // Keras 2 puts a Sequential model's input shape on its first layer.
            let shape = l
                .get_mut("config")
                .and_then(Value::as_object_mut)
                .and_then(|c| c.remove("batch_input_shape"));
            // (Keras 2 also writes it there beside an InputLayer that gives the same shape.)
            let after_input = out.len() == 1 && out[0]["class_name"] == "InputLayer";
            if let Some(shape) = shape.filter(|_| !after_input) {
                if !out.is_empty() {
                    return Err(error_at(
                        file,
                        &lat(i),
                        "`batch_input_shape` on a layer other than the first",
                    ));
                }
                let name = format!(
                    "{}_input",
                    cfg.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("sequential")
                );
                out.push(json!({"class_name": "InputLayer", "config": {
                    "batch_shape": shape, "dtype": "float32", "sparse": false, "ragged": false,
                    "name": name}}));
            }
            out.push(l);
        }
    } else {
        // Keras 2 counts a nested model's nodes from 1: its node 0 is the one it was built with.
        // (Keras 3's nodes, `{"args": …}`, count from 0.)
        let keras2 = layers.iter().any(|l| {
            l.get("inbound_nodes")
                .and_then(Value::as_array)
                .is_some_and(|n| n.iter().any(Value::is_array))
        });
        let offset: Vec<String> = layers
            .iter()
            .filter(|l| keras2 && skips_first_node(l))
            .filter_map(layer_name)
            .collect();
        for (i, l) in layers.iter().enumerate() {
            let mut l = translate_layer(l, &lat(i), file)?;
            if let Some(nodes) = l.get("inbound_nodes").and_then(Value::as_array).cloned() {
                let nat = join(&lat(i), "inbound_nodes");
                let nodes = nodes
                    .iter()
                    .enumerate()
                    .map(|(k, n)| translate_node(n, &format!("{nat}[{k}]"), file, &offset))
                    .collect::<Result<Vec<_>>>()?;
                l["inbound_nodes"] = Value::Array(nodes);
            }
            out.push(l);
        }
        for key in ["input_layers", "output_layers"] {
            if let Some(v) = cfg.get_mut(key) {
                shift_refs(v, &offset);
            }
        }
    }
    cfg.insert("layers".into(), Value::Array(out));
    m.insert("config".into(), Value::Object(cfg));
    if class == "Model" {
        m.insert("class_name".into(), "Functional".into());
    }
    m.entry("module").or_insert_with(|| {
        if class == "Sequential" {
            "keras.src.models.sequential".into()
        } else {
            "keras.src.models.functional".into()
        }
    });
    Ok(Value::Object(m))
}

fn layer_name(l: &Value) -> Option<String> {
    l.get("name")
        .or_else(|| l.get("config").and_then(|c| c.get("name")))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Whether Keras 2 counts this layer's nodes from 1: a nested model that starts with its own
/// InputLayer (Keras 2's `_should_skip_first_node`).
fn skips_first_node(l: &Value) -> bool {
    match l.get("class_name").and_then(Value::as_str) {
        Some("Functional" | "Model") => true,
        Some("Sequential") => l["config"]["layers"].get(0).is_some_and(|first| {
            first["class_name"] == "InputLayer"
                || first["config"].get("batch_input_shape").is_some()
        }),
        _ => false,
    }
}

/// `[layer, node, tensor]` (or a list of them) with Keras 2's node offset removed.
fn shift_refs(v: &mut Value, offset: &[String]) {
    let Some(items) = v.as_array_mut() else {
        return;
    };
    if items.first().is_some_and(Value::is_string) {
        let shifted = items
            .first()
            .and_then(Value::as_str)
            .is_some_and(|n| offset.iter().any(|o| o == n));
        if shifted {
            if let Some(k) = items.get(1).and_then(Value::as_u64) {
                items[1] = k.saturating_sub(1).into();
            }
        }
        return;
    }
    for item in items {
        shift_refs(item, offset);
    }
}

/// A Keras 2 node (`[[layer, node, tensor, kwargs], …]`) as a Keras 3 one (`{"args": …,
/// "kwargs": …}`, tensors without shapes); a Keras 3 node as it is.
fn translate_node(n: &Value, at: &str, file: &str, offset: &[String]) -> Result<Value> {
    let Some(items) = n.as_array() else {
        return Ok(n.clone());
    };
    let mut tensors = Vec::new();
    let mut kwargs = Map::new();
    for (j, item) in items.iter().enumerate() {
        let here = format!("{at}[{j}]");
        let parts = item.as_array().map(Vec::as_slice).unwrap_or_default();
        let (name, node, index) = match parts {
            [Value::String(n), a, b, ..] if a.is_u64() && b.is_u64() => {
                (n.clone(), a.as_u64().unwrap_or(0), b.as_u64().unwrap_or(0))
            }
            _ => {
                return Err(error_at(
                    file,
                    &here,
                    format!(
                        "expected [layer, node, tensor, kwargs], got {}",
                        short(item)
                    ),
                ))
            }
        };
        if let Some(kw) = parts.get(3) {
            let kw = obj(kw, file, &format!("{here}[3]"))?;
            for (k, v) in kw {
                // Keras' fit and predict set the training flag of every call themselves.
                if k != "training" {
                    return Err(error_at(
                        file,
                        &format!("{here}[3].{k}"),
                        format!(
                            "call argument `{k}` = {} is not supported: kiln reads Keras 2 nodes \
                             that pass tensors only",
                            short(v)
                        ),
                    ));
                }
                kwargs.insert(k.clone(), v.clone());
            }
        }
        let node = if offset.contains(&name) {
            node.checked_sub(1).ok_or_else(|| {
                error_at(
                    file,
                    &here,
                    format!("node 0 of the nested model `{name}` is its own input, not an output"),
                )
            })?
        } else {
            node
        };
        tensors.push(json!({"class_name": "__keras_tensor__",
            "config": {"dtype": "float32", "keras_history": [name, node, index]}}));
    }
    let arg = match tensors.len() {
        1 => tensors.remove(0),
        _ => Value::Array(tensors),
    };
    Ok(json!({"args": [arg], "kwargs": kwargs}))
}

/// A layer entry with its Keras 2 options spelled as Keras 3 writes them; a nested model is
/// translated as a model.
fn translate_layer(l: &Value, at: &str, file: &str) -> Result<Value> {
    let class = l.get("class_name").and_then(Value::as_str).unwrap_or("");
    if matches!(class, "Functional" | "Model" | "Sequential") {
        let mut m = translate_model(l, at, file)?;
        if let (Some(o), Some(orig)) = (m.as_object_mut(), l.as_object()) {
            for key in ["name", "inbound_nodes"] {
                if let Some(v) = orig.get(key) {
                    o.insert(key.into(), v.clone());
                }
            }
        }
        return Ok(m);
    }
    let mut l = obj(l, file, at)?.clone();
    let cat = join(at, "config");
    let mut cfg = obj(
        l.get("config")
            .ok_or_else(|| error_at(file, at, "`config` is missing"))?,
        file,
        &cat,
    )?
    .clone();
    // A Keras 2 option that Keras 3 dropped: removed when it has the value that computes what
    // Keras 3 computes, refused otherwise.
    let mut drop_if = |key: &str, ok: &dyn Fn(&Value) -> bool, what: &str| -> Result<()> {
        match cfg.remove(key) {
            Some(v) if !ok(&v) => Err(error_at(
                file,
                &join(&cat, key),
                format!("{} is not supported: kiln supports {what}", short(&v)),
            )),
            _ => Ok(()),
        }
    };
    match class {
        "InputLayer" => {
            if let Some(s) = cfg.remove("batch_input_shape") {
                cfg.insert("batch_shape".into(), s);
            }
        }
        "LSTM" | "GRU" => {
            drop_if(
                "time_major",
                &|v| v == &Value::Bool(false),
                "time_major = false",
            )?;
            // Keras' two implementations compute the same values.
            drop_if("implementation", &|_| true, "")?;
        }
        "BatchNormalization" => {
            drop_if("fused", &|_| true, "")?;
            drop_if("virtual_batch_size", &Value::is_null, "no virtual batches")?;
            drop_if("adjustment", &Value::is_null, "no adjustment")?;
            // Keras 2 writes the axis as a list; Keras 3's BatchNormalization takes one int.
            if let Some(Value::Array(a)) = cfg.get("axis") {
                if let [one] = a.as_slice() {
                    let one = one.clone();
                    cfg.insert("axis".into(), one);
                }
            }
        }
        "Embedding" => {
            // The sequence length Keras 2 recorded is the input's, which the graph gives.
            drop_if("input_length", &|_| true, "")?;
        }
        _ => {}
    }
    l.insert("config".into(), Value::Object(cfg));
    l.entry("module").or_insert_with(|| "keras.layers".into());
    Ok(Value::Object(l))
}

/// `training_config` as Keras 3's `compile_config`: `optimizer_config` becomes `optimizer`,
/// Keras 2's metric objects their names, the `auto` reduction `sum_over_batch_size`.
fn compile_config(tc: &Value, file: &str) -> Result<Value> {
    let mut tc = obj(tc, file, "")?.clone();
    if let Some(opt) = tc.remove("optimizer_config") {
        tc.insert("optimizer".into(), optimizer(&opt, file)?);
    }
    if let Some(loss) = tc.get_mut("loss") {
        keras2_losses(loss);
    }
    if let Some(m) = tc.remove("metrics") {
        tc.insert("metrics".into(), metrics(&m, "metrics", file)?);
    }
    Ok(Value::Object(tc))
}

/// Keras 2's spellings in the loss objects of `v`: the `auto` reduction is
/// `sum_over_batch_size`; a built-in loss class records the function it wraps (`fn`), which is
/// its own; a `LossFunctionWrapper` of a built-in function is that function's name; a class
/// gets the `module` Keras 3 looks it up by.
fn keras2_losses(v: &mut Value) {
    match v {
        Value::Object(m) if m.contains_key("class_name") => {
            let wrapper = m["class_name"] == "LossFunctionWrapper";
            // Keras 3 finds a built-in class by its module.
            if !m["class_name"].as_str().is_some_and(|c| c.contains('>')) {
                m.entry("module").or_insert_with(|| "keras.losses".into());
                m.entry("registered_name").or_insert(Value::Null);
            }
            if let Some(Value::Object(c)) = m.get_mut("config") {
                if c.get("reduction").and_then(Value::as_str) == Some("auto") {
                    c.insert("reduction".into(), "sum_over_batch_size".into());
                }
                let plain = c
                    .keys()
                    .all(|k| matches!(k.as_str(), "fn" | "name" | "reduction"))
                    && c.get("reduction").and_then(Value::as_str) == Some("sum_over_batch_size");
                match (
                    wrapper,
                    c.get("fn").and_then(Value::as_str).map(str::to_string),
                ) {
                    (true, Some(f)) if plain => *v = Value::String(f),
                    (false, Some(_)) => {
                        c.remove("fn");
                    }
                    _ => {}
                }
            }
        }
        Value::Object(m) => m.values_mut().for_each(keras2_losses),
        Value::Array(a) => a.iter_mut().for_each(keras2_losses),
        _ => {}
    }
}

/// Keras 2's metric objects by the names kiln reads (`MeanMetricWrapper` of a function: the
/// name the user gave, or the function; a metric class with no parameter: its name).
fn metrics(v: &Value, at: &str, file: &str) -> Result<Value> {
    Ok(match v {
        Value::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| metrics(x, &format!("{at}[{i}]"), file))
                .collect::<Result<_>>()?,
        ),
        Value::Object(m) if m.contains_key("class_name") => {
            let class = m["class_name"].as_str().unwrap_or("");
            let cfg = m.get("config").and_then(Value::as_object);
            let get = |k: &str| cfg.and_then(|c| c.get(k)).and_then(Value::as_str);
            let name = match class {
                "MeanMetricWrapper" => match (get("name"), get("fn")) {
                    (Some(n @ ("accuracy" | "acc")), _) => n.to_string(),
                    (_, Some(f)) => f.to_string(),
                    _ => return Err(error_at(file, at, "a MeanMetricWrapper without `fn`")),
                },
                _ if cfg.is_some_and(|c| c.keys().all(|k| k == "name" || k == "dtype")) => {
                    get("name").unwrap_or(class).to_string()
                }
                _ => {
                    return Err(error_at(
                        file,
                        at,
                        format!(
                            "metric `{class}` with parameters is not supported: kiln imports the \
                             metrics it has by name"
                        ),
                    ))
                }
            };
            Value::String(name)
        }
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), metrics(x, &format!("{at}.{k}"), file)?)))
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

/// `optimizer_config` as a Keras 3 optimizer object.
fn optimizer(v: &Value, file: &str) -> Result<Value> {
    let at = "optimizer_config";
    let mut m = obj(v, file, at)?.clone();
    if let Some(Value::String(c)) = m.get("class_name") {
        let c = c.trim_start_matches("Custom>").to_string();
        m.insert("class_name".into(), c.into());
    }
    if let Some(Value::Object(c)) = m.get_mut("config") {
        if c.remove("is_legacy_optimizer") == Some(Value::Bool(true)) {
            return Err(error_at(
                file,
                at,
                "a tf.keras legacy optimizer (tf.keras.optimizers.legacy), whose update differs \
                 from Keras 3's: load the model uncompiled with kiln::keras::load(path, false) \
                 and compile it in kiln",
            ));
        }
        // How TensorFlow compiled the update changes no value.
        c.remove("jit_compile");
    }
    m.entry("module")
        .or_insert_with(|| "keras.optimizers".into());
    m.entry("registered_name").or_insert(Value::Null);
    Ok(Value::Object(m))
}

/// Writes the shapes kiln computed into the tensors of `config` that recorded none (Keras 2's
/// nodes), so that the config exports as Keras 3 writes it; `filled` pairs each tensor's JSON
/// path (`config.layers[3].inbound_nodes[0].args[0][1]`) with its sample shape.
pub(crate) fn fill_shapes(config: &mut Value, filled: &[(String, Vec<usize>)]) {
    for (path, shape) in filled {
        let mut pointer = String::new();
        for part in path.split('.') {
            let mut pieces = part.split('[');
            if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
                pointer.push('/');
                pointer.push_str(key);
            }
            for index in pieces {
                pointer.push('/');
                pointer.push_str(index.trim_end_matches(']'));
            }
        }
        if let Some(Value::Object(c)) = config.pointer_mut(&format!("{pointer}/config")) {
            let mut s = vec![Value::Null];
            s.extend(shape.iter().map(|&d| Value::from(d)));
            c.insert("shape".into(), Value::Array(s));
        }
    }
}

/// Where each weight of `slots` is stored: `(kiln weight name, group, dataset)`. The weights
/// of a top-level layer sit in `model_weights/<layer>`, listed by its `weight_names`
/// attribute (`dense/kernel:0`; Keras 3: `sequential/dense/kernel`; in a nested model
/// `dense_1/kernel:0` under the model's group); each kiln weight is the listed name whose last
/// part is the weight and whose layer part is the layer's own name. Every listed weight must be
/// used, and no weight listed twice.
pub(crate) fn locate(
    file: &WeightsFile,
    slots: &[LayerSlot],
) -> Result<Vec<(String, String, String)>> {
    use std::collections::BTreeMap;
    let mut listed: BTreeMap<String, (Vec<String>, Vec<bool>)> = BTreeMap::new();
    let mut out = Vec::new();
    for slot in slots.iter().filter(|s| !s.weights.is_empty()) {
        let top = slot
            .kiln
            .split('/')
            .next()
            .unwrap_or(&slot.kiln)
            .to_string();
        let own = slot.kiln.rsplit('/').next().unwrap_or(&slot.kiln);
        let group = format!("model_weights/{top}");
        if !listed.contains_key(&top) {
            let names = file.attr_strings(&group, "weight_names")?.ok_or_else(|| {
                Error::Data(format!(
                    "{}: /{group}: layer `{top}` has no `weight_names` attribute: the file \
                     stores no weights for it",
                    file.shown()
                ))
            })?;
            let n = names.len();
            listed.insert(top.clone(), (names, vec![false; n]));
        }
        let (names, used) = listed.get_mut(&top).expect("inserted above");
        for w in &slot.weights {
            let matches: Vec<usize> = names
                .iter()
                .enumerate()
                .filter(|(_, n)| weight_of(n) == Some((own, w)))
                .map(|(i, _)| i)
                .collect();
            let i = match matches.as_slice() {
                [i] => *i,
                [] => {
                    return Err(Error::Data(format!(
                        "{}: /{group}: weight `{}/{w}` is not listed in `weight_names` {names:?}: \
                         the weights do not fit the model_config",
                        file.shown(),
                        slot.kiln
                    )))
                }
                _ => {
                    return Err(Error::Data(format!(
                        "{}: /{group}: weight `{}/{w}` is listed more than once in \
                         `weight_names` {names:?}",
                        file.shown(),
                        slot.kiln
                    )))
                }
            };
            used[i] = true;
            let full = format!("{group}/{}", names[i]);
            let (g, d) = full.rsplit_once('/').expect("has a group");
            out.push((format!("{}/{w}", slot.kiln), g.to_string(), d.to_string()));
        }
    }
    for (top, (names, used)) in &listed {
        if let Some((n, _)) = names.iter().zip(used).find(|(_, u)| !**u) {
            return Err(Error::Data(format!(
                "{}: /model_weights/{top}: stores weight `{n}`, which no layer of the \
                 model_config has: the two describe different architectures",
                file.shown()
            )));
        }
    }
    Ok(out)
}

/// The layer name and weight of a listed weight name: `lstm/lstm_cell/kernel:0` gives
/// `("lstm", "kernel")` (a recurrent cell's part is skipped).
fn weight_of(name: &str) -> Option<(&str, &str)> {
    let name = name.strip_suffix(":0").unwrap_or(name);
    let mut parts = name.rsplit('/');
    let weight = parts.next()?;
    let layer = parts.find(|p| !is_cell(p))?;
    Some((layer, weight))
}

fn is_cell(part: &str) -> bool {
    let base = part.trim_end_matches(|c: char| c.is_ascii_digit());
    let base = base.strip_suffix('_').unwrap_or(base);
    matches!(base, "lstm_cell" | "gru_cell")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_names_of_keras_2_and_keras_3() {
        assert_eq!(weight_of("dense/kernel:0"), Some(("dense", "kernel")));
        assert_eq!(
            weight_of("sequential/hidden/bias"),
            Some(("hidden", "bias"))
        );
        assert_eq!(
            weight_of("l/lstm_cell_1/recurrent_kernel:0"),
            Some(("l", "recurrent_kernel"))
        );
        assert_eq!(weight_of("kernel"), None);
    }

    #[test]
    fn keras_2_nodes_become_keras_3_nodes() {
        let n = json!([["enc", 1, 0, {}], ["a", 0, 0, {"training": false}]]);
        let out = translate_node(&n, "n", "f", &["enc".to_string()]).unwrap();
        assert_eq!(
            out["args"][0][0]["config"]["keras_history"],
            json!(["enc", 0, 0])
        );
        assert_eq!(
            out["args"][0][1]["config"]["keras_history"],
            json!(["a", 0, 0])
        );
        assert_eq!(out["kwargs"], json!({"training": false}));
        let bad = json!([["a", 0, 0, {"mask": 1}]]);
        let e = translate_node(&bad, "n", "f", &[]).unwrap_err().to_string();
        assert!(e.contains("n[0][3].mask"), "{e}");
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-3i64..5).prop_map(Value::from),
            "[a-z_]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Any JSON as a Keras 2 node, a layer entry or a model config is translated or refused
        /// with a message naming the file, never a panic; a translated node's tensors each have
        /// a `[layer, node, tensor]` history.
        #[test]
        fn any_legacy_config_translates_or_is_refused(v in any_json(), class in "[A-Za-z]{0,12}") {
            match translate_node(&v, "n", "f.h5", &["enc".to_string()]) {
                Ok(n) if v.is_array() => {
                    let args = &n["args"][0];
                    let tensors = match args {
                        Value::Array(a) => a.clone(),
                        one => vec![one.clone()],
                    };
                    for t in tensors {
                        let h = t["config"]["keras_history"].as_array().cloned().unwrap_or_default();
                        proptest::prop_assert_eq!(h.len(), 3);
                    }
                }
                Ok(_) => {}
                Err(e) => proptest::prop_assert!(e.to_string().contains("f.h5: n")),
            }
            let layer = json!({"class_name": class, "config": v.clone(), "inbound_nodes": [v.clone()]});
            if let Err(e) = translate_layer(&layer, "l", "f.h5") {
                proptest::prop_assert!(e.to_string().contains("f.h5"));
            }
            let model = json!({"class_name": "Functional", "config": {"layers": [layer, v.clone()]}});
            if let Err(e) = translate_model(&model, "", "f.h5") {
                proptest::prop_assert!(e.to_string().contains("f.h5"));
            }
            let _ = compile_config(&json!({"loss": v.clone(), "metrics": v.clone(), "optimizer_config": v}), "t.h5");
        }
    }
}
