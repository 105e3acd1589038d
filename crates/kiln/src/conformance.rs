//! Conformance with Keras: runs the reference cases written by real Keras 3
//! (`shared/keras-reference/gen_keras_cases.py`) through kiln and compares every number.
//!
//! Three kinds of case: `loss` (per-sample values and the reduced value of one loss with
//! sample weights and masks), `regularizer` (one penalty) and `compile` (a small model through
//! `compile` and `evaluate`: the total-loss rule and the per-output log names, end to end).

use crate::error::{invalid, Error, Result};
use crate::graph::Input;
use crate::layers::{BuildContext, CallContext, Layer, LayerExt, Weight};
use crate::losses::config::JsonParams;
use crate::losses::{self, Loss};
use crate::reduction::Reduction;
use crate::regularizers::{self, SharedRegularizer};
use crate::{Compile, Dataset, Model};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use std::sync::Arc;

/// The outcome of a set of cases.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Cases whose every number matched.
    pub passed: usize,
    /// One line per failing case: kind, name, config, expected, got.
    pub failures: Vec<String>,
}

impl Report {
    /// The number of failing cases.
    pub fn failed(&self) -> usize {
        self.failures.len()
    }
    /// Adds another report's counts.
    pub fn merge(&mut self, other: Report) {
        self.passed += other.passed;
        self.failures.extend(other.failures);
    }
}

/// Runs every case of a reference file.
pub fn run_file(path: &std::path::Path) -> Result<Report> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    run_json(&text).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// Runs every case of a reference file's text.
pub fn run_json(text: &str) -> Result<Report> {
    let cases: Vec<Value> = serde_json::from_str(text)
        .map_err(|e| Error::Data(format!("not a JSON list of Keras reference cases: {e}")))?;
    let mut report = Report::default();
    for (i, case) in cases.iter().enumerate() {
        match run_case(case) {
            Ok(()) => report.passed += 1,
            Err(msg) => report.failures.push(format!("case {i}: {msg}")),
        }
    }
    Ok(report)
}

/// Runs one case; the error is the failure line.
pub fn run_case(case: &Value) -> std::result::Result<(), String> {
    let kind = case["kind"].as_str().unwrap_or("?");
    let result = match kind {
        "loss" => loss_case(case),
        "regularizer" => regularizer_case(case),
        "compile" => compile_case(case),
        other => Err(Mismatch::Error(format!("unknown case kind `{other}`"))),
    };
    result.map_err(|m| {
        let name = match kind {
            "loss" => case["loss"].as_str().unwrap_or("?").to_string(),
            "regularizer" => case["regularizer"].as_str().unwrap_or("?").to_string(),
            _ => format!(
                "{:?} {}",
                case["output_names"],
                case["loss_form"].as_str().unwrap_or("")
            ),
        };
        let config = match kind {
            "compile" => case["losses"].to_string(),
            "loss" => format!("{} reduction={}", case["config"], case["reduction"]),
            _ => case["config"].to_string(),
        };
        match m {
            Mismatch::Values {
                what,
                expected,
                got,
            } => {
                format!("{kind} {name} {config}: {what}: expected {expected}, got {got}")
            }
            Mismatch::Error(e) => format!("{kind} {name} {config}: error: {e}"),
        }
    })
}

enum Mismatch {
    Values {
        what: String,
        expected: String,
        got: String,
    },
    Error(String),
}

impl From<Error> for Mismatch {
    fn from(e: Error) -> Self {
        Mismatch::Error(e.to_string())
    }
}

impl From<candle_core::Error> for Mismatch {
    fn from(e: candle_core::Error) -> Self {
        Mismatch::Error(e.to_string())
    }
}

type CaseResult = std::result::Result<(), Mismatch>;

/// Tolerances of the reference README: rtol 1e-5 / atol 1e-6, rtol 1e-4 for exp/log-heavy losses.
fn rtol_for(loss: &str) -> f64 {
    match loss {
        "BinaryFocalCrossentropy" | "CategoricalFocalCrossentropy" | "CTC" | "Circle" => 1e-4,
        _ => 1e-5,
    }
}

fn close(expected: &[f64], got: &[f64], rtol: f64) -> bool {
    expected.len() == got.len()
        && expected
            .iter()
            .zip(got)
            .all(|(e, g)| (e - g).abs() <= 1e-6 + rtol * e.abs())
}

fn compare(what: &str, expected: &[f64], got: &[f64], rtol: f64) -> CaseResult {
    if close(expected, got, rtol) {
        return Ok(());
    }
    let show = |v: &[f64]| {
        let head: Vec<String> = v.iter().take(8).map(|x| format!("{x:.7}")).collect();
        format!(
            "[{}{}]",
            head.join(", "),
            if v.len() > 8 { ", …" } else { "" }
        )
    };
    Err(Mismatch::Values {
        what: what.into(),
        expected: show(expected),
        got: show(got),
    })
}

/// A nested JSON array (or a number) as its shape and values, read as f64.
fn nested_values(v: &Value) -> Result<(Vec<usize>, Vec<f64>)> {
    fn walk(v: &Value, depth: usize, shape: &mut Vec<usize>, out: &mut Vec<f64>) -> Result<()> {
        match v {
            Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len());
                } else if shape[depth] != items.len() {
                    return Err(invalid(
                        "ragged nested list: every row needs the same length",
                    ));
                }
                items
                    .iter()
                    .try_for_each(|item| walk(item, depth + 1, shape, out))
            }
            Value::Number(n) => {
                out.push(n.as_f64().ok_or_else(|| invalid("number out of range"))?);
                Ok(())
            }
            Value::Bool(b) => {
                out.push(if *b { 1.0 } else { 0.0 });
                Ok(())
            }
            other => Err(invalid(format!("expected a number, got {other}"))),
        }
    }
    let mut shape = Vec::new();
    let mut values = Vec::new();
    walk(v, 0, &mut shape, &mut values)?;
    Ok((shape, values))
}

/// A nested JSON array of numbers or booleans as an f32 tensor (the reference inputs are the
/// shortest decimals that read back as the same float32).
pub fn tensor_from_json(v: &Value, device: &Device) -> Result<Tensor> {
    let (shape, values) = nested_values(v)?;
    let values: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// Expected values, exactly as written (float32 results widened to f64).
fn flat(v: &Value) -> Result<Vec<f64>> {
    Ok(nested_values(v)?.1)
}

fn tensor_values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?)
}

/// Builds a built-in loss from its Keras class name and `get_config()`-style parameters: a thin
/// wrapper over the one strict parser, [`crate::losses::config::loss_from_config`].
///
/// ```
/// use kiln::reduction::Reduction;
/// let ok = serde_json::json!({ "delta": 0.5 });
/// assert!(kiln::conformance::loss_from_keras("Huber", &ok, Reduction::default()).is_ok());
/// let bad = serde_json::json!({ "delta": "0.5" });
/// assert!(kiln::conformance::loss_from_keras("Huber", &bad, Reduction::default()).is_err());
/// ```
///
/// # Errors
///
/// As [`crate::losses::config::loss_from_config`]: a parameter of the wrong type, NaN,
/// infinite, out of range or unknown, or an unknown loss; the message names `config.<key>`.
pub fn loss_from_keras(name: &str, config: &Value, reduction: Reduction) -> Result<Arc<dyn Loss>> {
    let place = format!("{name} config");
    json_object(config, &place)?;
    losses::config::loss_from_config(name, &JsonParams::new(config, place), reduction)
}

/// Builds a regularizer from its Keras class name and parameters: a thin wrapper over
/// [`crate::regularizers::regularizer_from_config`].
///
/// ```
/// let ok = serde_json::json!({ "l1": 0.01 });
/// assert!(kiln::conformance::regularizer_from_keras("L1", &ok).is_ok());
/// let bad = serde_json::json!({ "l1": -0.01 });
/// assert!(kiln::conformance::regularizer_from_keras("L1", &bad).is_err());
/// ```
///
/// # Errors
///
/// As [`crate::regularizers::regularizer_from_config`].
pub fn regularizer_from_keras(name: &str, config: &Value) -> Result<SharedRegularizer> {
    let place = format!("{name} config");
    json_object(config, &place)?;
    regularizers::regularizer_from_config(name, &JsonParams::new(config, place))
}

fn json_object(config: &Value, place: &str) -> Result<()> {
    if config.is_object() || config.is_null() {
        Ok(())
    } else {
        Err(invalid(format!(
            "{place}: expected an object of parameters, got {config}"
        )))
    }
}

fn reduction_of(case: &Value) -> Result<Reduction> {
    match &case["reduction"] {
        Value::Null => Ok(Reduction::None),
        Value::String(s) => s.parse(),
        other => Err(invalid(format!("bad reduction {other}"))),
    }
}

fn optional_tensor(v: &Value) -> Result<Option<Tensor>> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(Some(Tensor::new(
            n.as_f64().unwrap_or(0.0) as f32,
            &Device::Cpu,
        )?)),
        other => Ok(Some(tensor_from_json(other, &Device::Cpu)?)),
    }
}

fn loss_case(case: &Value) -> CaseResult {
    let name = case["loss"].as_str().unwrap_or("?");
    let reduction = reduction_of(case)?;
    let loss = loss_from_keras(name, &case["config"], reduction)?;
    let y_true = tensor_from_json(&case["y_true"], &Device::Cpu)?;
    let y_pred = tensor_from_json(&case["y_pred"], &Device::Cpu)?;
    let sample_weight = optional_tensor(&case["sample_weight"])?;
    let mask = optional_tensor(&case["mask"])?;
    let rtol = rtol_for(name);

    let values = loss.per_sample(&y_true, &y_pred)?;
    let shown = match &mask {
        Some(m) => values.mul(&m.reshape(values.shape())?)?,
        None => values.clone(),
    };
    compare(
        "per_sample",
        &flat(&case["per_sample"])?,
        &tensor_values(&shown)?,
        rtol,
    )?;
    let reduced = losses::reduce_per_sample(
        loss.as_ref(),
        &values,
        &y_true,
        &y_pred,
        sample_weight.as_ref(),
        mask.as_ref(),
    )?;
    compare(
        "reduced",
        &flat(&case["reduced"])?,
        &tensor_values(&reduced)?,
        rtol,
    )
}

fn regularizer_case(case: &Value) -> CaseResult {
    let reg = regularizer_from_keras(case["regularizer"].as_str().unwrap_or("?"), &case["config"])?;
    let weights = tensor_from_json(&case["weights"], &Device::Cpu)?;
    let value = reg.penalty(&weights)?;
    compare(
        "value",
        &flat(&case["value"])?,
        &tensor_values(&value)?,
        1e-5,
    )
}

/// A pass-through layer that owns regularized weights and an optional activity regularizer,
/// standing in for the identity layers of the reference models.
struct Holder {
    name: String,
    constants: Vec<(Tensor, SharedRegularizer)>,
    activity: Option<SharedRegularizer>,
    weights: Vec<Weight>,
}

impl Layer for Holder {
    fn kind(&self) -> &'static str {
        "holder"
    }
    fn given_name(&self) -> Option<&str> {
        Some(&self.name)
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        Ok(input_shapes[0].clone())
    }
    fn build(&mut self, name: &str, _shapes: &[Vec<usize>], _ctx: &mut BuildContext) -> Result<()> {
        for (i, (t, reg)) in self.constants.iter().enumerate() {
            self.weights.push(
                Weight::new(format!("{name}/w{i}"), Var::from_tensor(t)?, true)
                    .with_regularizer(Some(reg.clone())),
            );
        }
        Ok(())
    }
    fn weights(&self) -> Vec<Weight> {
        self.weights.clone()
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        Ok(inputs[0].clone())
    }
    fn activity_regularizer(&self) -> Option<&SharedRegularizer> {
        self.activity.as_ref()
    }
}

fn compile_case(case: &Value) -> CaseResult {
    let names: Vec<String> = case["output_names"]
        .as_array()
        .ok_or_else(|| Mismatch::Error("output_names missing".into()))?
        .iter()
        .map(|v| v.as_str().unwrap_or("?").to_string())
        .collect();
    let y_true: Vec<Tensor> = arr(&case["y_true"])?
        .iter()
        .map(|v| tensor_from_json(v, &Device::Cpu))
        .collect::<Result<_>>()?;
    let y_pred: Vec<Tensor> = arr(&case["y_pred"])?
        .iter()
        .map(|v| tensor_from_json(v, &Device::Cpu))
        .collect::<Result<_>>()?;
    let empty = Vec::new();
    let weight_regs = case["weight_regularizers"].as_array().unwrap_or(&empty);
    let activity_regs = case["activity_regularizers"].as_array().unwrap_or(&empty);

    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    for (i, (name, yp)) in names.iter().zip(&y_pred).enumerate() {
        let input = Input::named(format!("in_{name}"), &yp.dims()[1..]);
        let constants = if i == 0 {
            weight_regs
                .iter()
                .map(|r| {
                    let reg = regularizer_from_keras(
                        r["regularizer"].as_str().unwrap_or("?"),
                        &r["config"],
                    )?;
                    Ok((tensor_from_json(&r["weights"], &Device::Cpu)?, reg))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let activity = activity_regs
            .iter()
            .find(|r| r["output"].as_str() == Some(name))
            .map(|r| regularizer_from_keras(r["regularizer"].as_str().unwrap_or("?"), &r["config"]))
            .transpose()?;
        let holder = Holder {
            name: name.clone(),
            constants,
            activity,
            weights: Vec::new(),
        };
        outputs.push(holder.apply(&input)?);
        inputs.push(input);
    }
    let mut model = Model::new(&inputs, &outputs)?;
    for (i, term) in case["add_loss_mean_abs"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let factor = match term.get("factor") {
            None => 1.0,
            Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                invalid(format!(
                    "add_loss_mean_abs[{i}].factor: expected a number, got {v}"
                ))
            })?,
        };
        let of = term["of_output"].as_str().unwrap_or("?").to_string();
        model.add_loss(format!("mean_abs_{i}"), move |t: &crate::Tensors| {
            Ok((t.output(&of)?.abs()?.mean_all()? * factor)?)
        })?;
    }

    let specs: Vec<Option<Arc<dyn Loss>>> = arr(&case["losses"])?
        .iter()
        .map(|l| match l {
            Value::Null => Ok(None),
            l => loss_from_keras(
                l["loss"].as_str().unwrap_or("?"),
                &l["config"],
                Reduction::SumOverBatchSize,
            )
            .map(Some),
        })
        .collect::<Result<_>>()?;
    let mut compile = Compile::new(crate::optimizers::Sgd::new(0.0));
    compile = match case["loss_form"].as_str().unwrap_or("") {
        "single" | "single_for_all" => compile.loss(
            specs[0]
                .clone()
                .ok_or_else(|| Mismatch::Error("no loss".into()))?,
        ),
        "list" => {
            if specs.iter().any(Option::is_none) {
                return Err(Mismatch::Error(
                    "kiln's loss list has no empty entries: use loss_for".into(),
                ));
            }
            compile.losses(specs.iter().flatten().map(|l| l.clone().into()).collect())
        }
        "dict" => {
            for (name, spec) in names.iter().zip(&specs) {
                if let Some(l) = spec {
                    compile = compile.loss_for(name.clone(), l.clone());
                }
            }
            compile
        }
        other => return Err(Mismatch::Error(format!("unknown loss_form `{other}`"))),
    };
    if let Value::Array(ws) = &case["loss_weights"] {
        let ws: Vec<f64> = ws.iter().map(|w| w.as_f64().unwrap_or(f64::NAN)).collect();
        compile = match case["loss_weights_form"].as_str().unwrap_or("list") {
            "dict" => names
                .iter()
                .zip(&ws)
                .fold(compile, |c, (n, w)| c.loss_weight_for(n.clone(), *w)),
            _ => compile.loss_weights(ws),
        };
    }
    model.compile(compile)?;

    let mut data = Dataset::multi(y_pred.clone(), y_true)?;
    if let Some(sw) = optional_tensor(&case["sample_weight"])? {
        data = data.with_sample_weight(sw)?;
    }
    let logs = model.evaluate(&data, data.len())?;
    let keras_logs = case["logs"]
        .as_object()
        .ok_or_else(|| Mismatch::Error("logs missing".into()))?;
    for (key, expected) in keras_logs {
        let got = logs.get(key).ok_or_else(|| Mismatch::Values {
            what: format!("log `{key}`"),
            expected: expected.to_string(),
            got: format!(
                "no such log (kiln logged {:?})",
                logs.keys().collect::<Vec<_>>()
            ),
        })?;
        compare(
            &format!("log `{key}`"),
            &[expected.as_f64().unwrap_or(f64::NAN)],
            &[got],
            1e-5,
        )?;
    }
    let expected_added: f64 = flat(&case["additional_losses"])
        .unwrap_or_default()
        .iter()
        .sum();
    // Per-output logs appear when Keras has them, and kiln also reports a lone compile-time
    // loss when added terms share the total (Keras folds it into `loss`): that one, times its
    // loss weight, must equal Keras' `loss` less its added terms.
    let single = logs.keys().filter(|k| k.ends_with("_loss")).count() == 1;
    for (key, got) in logs.iter().filter(|(k, _)| k.ends_with("_loss")) {
        if keras_logs.contains_key(key) {
            continue;
        }
        let output = names.iter().position(|n| format!("{n}_loss") == key);
        let weight = match (&case["loss_weights"], output) {
            (Value::Array(ws), Some(i)) => ws.get(i).and_then(Value::as_f64).unwrap_or(1.0),
            _ => 1.0,
        };
        match (single, keras_logs.get("loss").and_then(Value::as_f64)) {
            (true, Some(loss)) => compare(
                &format!("log `{key}` times its loss weight (loss less the added terms)"),
                &[loss - expected_added],
                &[got * weight],
                1e-5,
            )?,
            _ => {
                return Err(Mismatch::Values {
                    what: "per-output log names".into(),
                    expected: format!("{:?}", keras_logs.keys().collect::<Vec<_>>()),
                    got: format!("{:?}", logs.keys().collect::<Vec<_>>()),
                })
            }
        }
    }
    // The added terms, reported on their own, sum to Keras' `model.losses`.
    let added: f64 = logs
        .iter()
        .filter(|(k, _)| *k != "loss" && !k.ends_with("_loss"))
        .map(|(_, v)| v)
        .sum();
    compare("sum of added terms", &[expected_added], &[added], 1e-5)
}

fn arr(v: &Value) -> std::result::Result<&Vec<Value>, Mismatch> {
    v.as_array()
        .ok_or_else(|| Mismatch::Error(format!("expected a list, got {v}")))
}
