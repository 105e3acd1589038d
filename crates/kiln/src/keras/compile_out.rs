//! kiln's compile state as Keras' `compile_config`, for `save_keras`: the optimizer with its
//! hyperparameters (and current learning rate), each output's loss with its parameters
//! (a registered custom loss by its registered name, as Keras writes a registered function),
//! `loss_weights`, and the metrics by their Keras names. What Keras cannot express (a loss or
//! optimizer Keras has no class for, an unregistered closure, an added loss, a loss weighting
//! strategy) is an error naming it: nothing is silently dropped.

use crate::error::{Error, Result};
use crate::losses::Loss;
use crate::model::Model;
use crate::reduction::Reduction;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The `compile_config` of `model`, or `None` when it is not compiled. `outputs` holds the
/// Keras name of each kiln output, in kiln's output order; `shown` names the file written.
pub(crate) fn compile_config(
    model: &Model,
    outputs: &[String],
    shown: &str,
) -> Result<Option<Value>> {
    let Some(c) = model.compiled.as_ref() else {
        return Ok(None);
    };
    let refuse = |what: String| {
        Error::Data(format!(
            "{shown}: {what}; nothing was written (kiln::keras::save(&model, path, false), or \
             `kiln export --uncompiled`, writes the model uncompiled, to compile in Keras)"
        ))
    };
    let optimizer = c.optimizer.keras_config().ok_or_else(|| {
        refuse(format!(
            "optimizer `{}` has no Keras equivalent (kiln exports SGD, Adam, AdamW, RMSprop, Nadam, Adamax, Adagrad, Adadelta and Lion)",
            c.optimizer.name()
        ))
    })?;
    if let Some(w) = &c.weighting {
        return Err(refuse(format!(
            "the loss weighting strategy `{}` has no Keras equivalent",
            w.lock().name()
        )));
    }
    if let Some(name) = model.added_term_names().first() {
        return Err(refuse(format!(
            "the added loss `{name}` has no Keras equivalent (Keras' compile_config holds \
             compile-time losses only; layer regularizers travel with their layers)"
        )));
    }
    // Dicts by output name when the names are unique (as Keras writes dict losses); lists in
    // output order otherwise.
    let unique = {
        let mut seen = std::collections::HashSet::new();
        outputs.iter().all(|o| seen.insert(o))
    };
    let single = outputs.len() == 1;
    let mut losses: Vec<Option<Value>> = vec![None; outputs.len()];
    let mut weights: Vec<Option<f64>> = vec![None; outputs.len()];
    for l in &c.losses {
        let output = &outputs[l.output];
        losses[l.output] = Some(loss_object(&l.loss, output).map_err(|e| refuse(e.to_string()))?);
        weights[l.output] = Some(l.weight);
    }
    let per_output = |values: Vec<Option<Value>>| -> Value {
        if single {
            return values.into_iter().next().flatten().unwrap_or(Value::Null);
        }
        if unique {
            let m: Map<String, Value> = outputs
                .iter()
                .zip(values)
                .filter_map(|(o, v)| v.map(|v| (o.clone(), v)))
                .collect();
            return Value::Object(m);
        }
        Value::Array(
            values
                .into_iter()
                .map(|v| v.unwrap_or(Value::Null))
                .collect(),
        )
    };
    let any_loss = losses.iter().any(Option::is_some);
    let loss = if any_loss {
        per_output(losses)
    } else {
        Value::Null
    };
    let loss_weights = if weights.iter().flatten().all(|w| *w == 1.0) {
        Value::Null
    } else {
        per_output(weights.into_iter().map(|w| w.map(Value::from)).collect())
    };
    let mut metrics: [Vec<Vec<Value>>; 2] = [
        vec![Vec::new(); outputs.len()],
        vec![Vec::new(); outputs.len()],
    ];
    for m in &c.metrics {
        // By the name it was given, else as a Keras metric object with its parameters.
        let value = match &m.keras_name {
            Some(name) => Value::String(name.clone()),
            None => m.metric.keras_config().ok_or_else(|| {
                refuse(format!(
                    "metric `{}` has no Keras equivalent (Keras has no metric class for it; \
                     kiln exports its built-in metrics, by name or with their parameters)",
                    m.log_name
                ))
            })?,
        };
        metrics[usize::from(m.weighted)][m.output].push(value);
    }
    let [plain, weighted] = metrics.map(|lists| {
        if lists.iter().all(Vec::is_empty) {
            Value::Null
        } else {
            per_output(
                lists
                    .into_iter()
                    .map(|l| (!l.is_empty()).then_some(Value::Array(l)))
                    .collect(),
            )
        }
    });
    Ok(Some(json!({
        "optimizer": optimizer,
        "loss": loss,
        "loss_weights": loss_weights,
        "metrics": plain,
        "weighted_metrics": weighted,
        "run_eagerly": false,
        "steps_per_execution": 1,
        "jit_compile": true,
    })))
}

/// A loss as Keras serializes it: a registered loss as Keras writes a registered function
/// (`{"class_name": "function", "config": "<registered name>"}`), a built-in one as its class
/// with every parameter.
fn loss_object(loss: &Arc<dyn Loss>, output: &str) -> Result<Value> {
    if let Some(name) = crate::losses::registered_name_of(loss) {
        if loss.reduction() != Reduction::SumOverBatchSize {
            return Err(Error::Data(format!(
                "the registered loss `{name}` of output `{output}` has reduction `{}`, which a \
                 Keras function loss cannot carry (Keras reduces it with sum_over_batch_size)",
                loss.reduction()
            )));
        }
        return Ok(json!({
            "module": "builtins", "class_name": "function", "config": name,
            "registered_name": "function",
        }));
    }
    loss.keras_config().ok_or_else(|| {
        if crate::losses::is_registered(loss.name()) {
            return Error::Data(format!(
                "the loss `{0}` of output `{output}` is not the value registered under `{0}` \
                 (it was built separately, with the same name): compile with \
                 kiln::losses::by_name(\"{0}\") so that the model holds the registered loss, \
                 which is exported by its name",
                loss.name()
            ));
        }
        Error::Data(format!(
            "the loss `{}` of output `{output}` has no Keras equivalent: register it with \
             kiln::losses::register(\"NAME\", …) to export it by that name (and register a \
             Keras function of the same name with keras.saving.register_keras_serializable \
             to load the file)",
            loss.name()
        ))
    })
}
