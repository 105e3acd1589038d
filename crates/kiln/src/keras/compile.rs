//! Keras' `compile_config` to kiln's [`Compile`]: the optimizer and its hyperparameters, the
//! losses with their parameters (custom ones by their registered names), `loss_weights` and
//! the metrics kiln has. Anything else is an error naming it.

use super::json::{short, Obj};
use crate::error::{Error, Result};
use crate::losses::LossSpec;
use crate::metrics::MetricSpec;
use crate::model::Compile;
use crate::optimizers::{
    Adadelta, Adagrad, Adam, AdamW, Adamax, LearningRateSchedule, Lion, Nadam, Optimizer, RmsProp,
    Scheduled, Sgd,
};
use crate::reduction::Reduction;
use serde_json::Value;

/// The kiln compile configuration of `cc` (`compile_config`); `outputs` pairs each Keras
/// output name with the kiln output it became.
pub(crate) fn compile(cc: &Obj, outputs: &[(String, String)]) -> Result<Compile> {
    let optimizer = optimizer(cc)?;
    let mut c = Compile::from_boxed(optimizer);
    let kiln_output = |key: &str, name: &str| -> Result<String> {
        outputs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, kiln)| kiln.clone())
            .ok_or_else(|| {
                cc.error(
                    key,
                    format!(
                        "`{name}` is not an output; the outputs are {:?}",
                        outputs.iter().map(|(k, _)| k).collect::<Vec<_>>()
                    ),
                )
            })
    };
    match cc.get("loss") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if !is_object_config(m) => {
            for (name, v) in m {
                let at = cc.at(&format!("loss.{name}"));
                c = c.loss_for(kiln_output("loss", name)?, loss(cc, v, &at)?);
            }
        }
        Some(Value::Array(items)) => {
            let specs = items
                .iter()
                .enumerate()
                .map(|(i, v)| loss(cc, v, &cc.at(&format!("loss[{i}]"))))
                .collect::<Result<Vec<_>>>()?;
            c = c.losses(specs);
        }
        Some(v) => c = c.loss(loss(cc, v, &cc.at("loss"))?),
    }
    match cc.get("loss_weights") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (name, w) in m {
                let w = number(cc, w, &format!("loss_weights.{name}"))?;
                c = c.loss_weight_for(kiln_output("loss_weights", name)?, w);
            }
        }
        Some(Value::Array(items)) => {
            let ws = items
                .iter()
                .enumerate()
                .map(|(i, w)| number(cc, w, &format!("loss_weights[{i}]")))
                .collect::<Result<Vec<_>>>()?;
            c = c.loss_weights(ws);
        }
        Some(w) => c = c.loss_weight(number(cc, w, "loss_weights")?),
    }
    c = metrics(cc, "metrics", c, outputs, &kiln_output, false)?;
    c = metrics(cc, "weighted_metrics", c, outputs, &kiln_output, true)?;
    // How Keras runs a step (eagerly, jitted, several per call) changes no value.
    cc.ignore(&[
        "run_eagerly",
        "steps_per_execution",
        "jit_compile",
        "auto_scale_loss",
    ]);
    cc.finish("compile_config")?;
    Ok(c)
}

/// `metrics` or `weighted_metrics` (`weighted`): one list for every output, a list of lists
/// in output order, or a dict by output name.
fn metrics(
    cc: &Obj,
    key: &str,
    mut c: Compile,
    outputs: &[(String, String)],
    kiln_output: &dyn Fn(&str, &str) -> Result<String>,
    weighted: bool,
) -> Result<Compile> {
    let add = |c: Compile, output: Option<String>, spec: MetricSpec| match (output, weighted) {
        (Some(o), false) => c.metric_for(o, spec),
        (Some(o), true) => c.weighted_metric_for(o, spec),
        (None, false) => c.metric(spec),
        (None, true) => c.weighted_metric(spec),
    };
    match cc.get(key) {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (name, list) in m {
                let output = kiln_output(key, name)?;
                for (i, v) in as_list(list).iter().enumerate() {
                    let spec = metric(cc, v, &format!("{key}.{name}[{i}]"))?;
                    c = add(c, Some(output.clone()), spec);
                }
            }
        }
        Some(Value::Array(items)) => {
            for (i, v) in items.iter().enumerate() {
                if let Value::Array(per_output) = v {
                    let (_, output) = outputs.get(i).ok_or_else(|| {
                        cc.error(
                            key,
                            format!(
                                "{} lists of metrics for {} outputs",
                                items.len(),
                                outputs.len()
                            ),
                        )
                    })?;
                    for (j, m) in per_output.iter().enumerate() {
                        c = add(
                            c,
                            Some(output.clone()),
                            metric(cc, m, &format!("{key}[{i}][{j}]"))?,
                        );
                    }
                } else {
                    c = add(c, None, metric(cc, v, &format!("{key}[{i}]"))?);
                }
            }
        }
        Some(v) => c = add(c, None, metric(cc, v, key)?),
    }
    Ok(c)
}

fn as_list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Null => Vec::new(),
        other => vec![other.clone()],
    }
}

/// Whether an object is a serialized Keras object (`{"class_name": …, "config": …}`) rather
/// than a dict of per-output values.
fn is_object_config(m: &serde_json::Map<String, Value>) -> bool {
    m.contains_key("class_name") && m.contains_key("config")
}

fn number(cc: &Obj, v: &Value, key: &str) -> Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| cc.error(key, format!("expected a finite number, got {}", short(v))))
}

fn metric(cc: &Obj, v: &Value, key: &str) -> Result<MetricSpec> {
    let name = match v {
        Value::String(s) => s.clone(),
        Value::Object(m) if is_object_config(m) => return metric_object(cc, v, key),
        other => return Err(cc.error(key, format!("expected a metric name, got {}", short(other)))),
    };
    let spec = MetricSpec::Named(name.clone());
    spec.resolve().map_err(|e| cc.error(key, e))?;
    Ok(spec)
}

/// A serialized Keras metric (`{"class_name": "AUC", "config": {"name": "pr_auc", "curve":
/// "PR", …}}`): the kiln metric of that class with every parameter, logged under its name.
fn metric_object(cc: &Obj, v: &Value, key: &str) -> Result<MetricSpec> {
    let o = Obj::new(v, key.to_string(), cc.file)?;
    let class = o.str("class_name")?.to_string();
    o.ignore(&["module", "shared_object_id"]);
    o.expect(
        "registered_name",
        |r| r.is_null() || r.as_str() == Some(class.as_str()),
        "built-in metrics",
    )?;
    let Some(kiln_name) = crate::metrics::config::metric_name_of_class(&class) else {
        return Err(o.error(
            "class_name",
            format!(
                "kiln has no metric `{class}`: kiln has {}",
                crate::metrics::config::KERAS_METRIC_CLASSES.join(", ")
            ),
        ));
    };
    let cfg = o.obj("config")?;
    let log_name = cfg.str("name")?.to_string();
    match cfg.get("dtype") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) if d == "float32" => {}
        Some(other) => {
            return Err(cfg.error(
                "dtype",
                format!(
                    "{} is not supported: kiln's metrics compute in float32 and float64",
                    short(other)
                ),
            ))
        }
    }
    // Keras writes every parameter; a null one is its default, except R2Score's
    // class_aggregation, where null means no aggregation.
    let params: serde_json::Map<String, Value> = cfg
        .rest()
        .into_iter()
        .filter(|(k, v)| {
            !matches!(k.as_str(), "name" | "dtype") && (!v.is_null() || *k == "class_aggregation")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let params = Value::Object(params);
    let place = format!("{}: {key}.config", cc.file);
    let metric = crate::metrics::config::metric_from_config(
        kiln_name,
        &crate::losses::config::JsonParams::new(&params, place.clone()),
    )
    .map_err(|e| Error::Data(format!("{place}: {e}")))?;
    let metric = if metric.name() == log_name {
        metric
    } else {
        crate::metrics::renamed(metric, log_name)
    };
    o.finish("a metric")?;
    Ok(MetricSpec::from(metric))
}

/// A loss: a name (built in or registered), or a serialized Keras loss.
fn loss(cc: &Obj, v: &Value, at: &str) -> Result<LossSpec> {
    let fail = |e: Error| Error::Data(format!("{}: {at}: {e}", cc.file));
    match v {
        Value::String(name) => {
            crate::losses::by_name(name).map_err(fail)?;
            Ok(LossSpec::Named(name.clone()))
        }
        Value::Object(_) => {
            let o = Obj::new(v, at.to_string(), cc.file)?;
            let class = o.str("class_name")?.to_string();
            // One loss object given to several outputs is marked shared; losses hold no state.
            o.ignore(&["module", "shared_object_id"]);
            let registered = o
                .get("registered_name")
                .and_then(Value::as_str)
                .filter(|r| *r != class)
                .map(str::to_string);
            if class == "function" {
                // A registered function, as Keras writes one: its registered name is the
                // config (`"Custom>my_loss"`).
                o.expect(
                    "registered_name",
                    |r| r.is_null() || r.as_str() == Some("function"),
                    "\"function\" for a function loss",
                )?;
                let key = o.str("config")?.to_string();
                let found = crate::losses::by_name(&key).map_err(|_| {
                    o.error(
                        "config",
                        format!(
                            "custom loss function `{key}` is not registered: call kiln::losses::register(\"{key}\", …) with a Rust version of it before loading"
                        ),
                    )
                })?;
                o.finish("a loss")?;
                return Ok(LossSpec::Loss(found));
            }
            let cfg = o.obj("config")?;
            let built_in =
                crate::losses::keras_class_name(&class).is_some() && registered.is_none();
            if !built_in {
                // A custom loss: kiln's registry, by the name Keras registered it under.
                let key = registered.clone().unwrap_or(class.clone());
                let found = crate::losses::by_name(&key)
                    .or_else(|_| crate::losses::by_name(&class))
                    .map_err(|_| {
                        o.error_here(format!(
                            "custom loss `{key}` is not registered: call kiln::losses::register(\"{key}\", …) with a Rust version of it before loading"
                        ))
                    })?;
                let _ = o.get("config");
                o.finish("a loss")?;
                return Ok(LossSpec::Loss(found));
            }
            let mut params = cfg_map(&cfg)?;
            cfg.ignore(&["name"]);
            params.remove("name");
            let reduction = match params.remove("reduction") {
                None | Some(Value::Null) => Reduction::default(),
                Some(Value::String(r)) => r.parse().map_err(|e| cfg.error("reduction", e))?,
                Some(other) => {
                    return Err(cfg.error(
                        "reduction",
                        format!("expected a string, got {}", short(&other)),
                    ))
                }
            };
            match params.remove("dtype") {
                None | Some(Value::Null) => {}
                Some(Value::String(d)) if d == "float32" => {}
                Some(other) => {
                    return Err(cfg.error(
                        "dtype",
                        format!(
                            "{} is not supported: kiln computes in float32",
                            short(&other)
                        ),
                    ))
                }
            }
            let built =
                crate::conformance::loss_from_keras(&class, &Value::Object(params), reduction)
                    .map_err(|e| Error::Data(format!("{}: {}.config: {e}", cc.file, at)))?;
            o.finish("a loss")?;
            Ok(LossSpec::Loss(built))
        }
        other => Err(cc.error_here(format!(
            "{at}: expected a loss name or object, got {}",
            short(other)
        ))),
    }
}

fn cfg_map(cfg: &Obj) -> Result<serde_json::Map<String, Value>> {
    let mut m = serde_json::Map::new();
    for key in ["name", "reduction", "dtype"] {
        if let Some(v) = cfg.get(key) {
            m.insert(key.to_string(), v.clone());
        }
    }
    // The rest: the loss's own parameters, checked by kiln's strict loss parser.
    for (k, v) in cfg.rest() {
        m.insert(k.clone(), v.clone());
    }
    Ok(m)
}

fn optimizer(cc: &Obj) -> Result<Box<dyn Optimizer>> {
    let v = cc.required("optimizer")?;
    let (class, o) = match v {
        Value::String(s) => {
            // A name: Keras' defaults.
            return Ok(match s.as_str() {
                "sgd" => Box::new(Sgd::new(0.01)),
                "adam" => Box::new(Adam::new(1e-3)),
                "adamw" => Box::new(AdamW::new(1e-3)),
                "rmsprop" => Box::new(RmsProp::new(1e-3)),
                "nadam" => Box::new(Nadam::new(1e-3)),
                "adamax" => Box::new(Adamax::new(1e-3)),
                "adagrad" => Box::new(Adagrad::new(1e-3)),
                "adadelta" => Box::new(Adadelta::new(1e-3)),
                "lion" => Box::new(Lion::new(1e-3)),
                other => {
                    return Err(cc.error(
                        "optimizer",
                        format!(
                            "kiln has no optimizer `{other}`: use sgd, adam, adamw, rmsprop, \
                             nadam, adamax, adagrad, adadelta or lion"
                        ),
                    ))
                }
            });
        }
        _ => {
            let o = cc.obj("optimizer")?;
            (o.str("class_name")?.to_string(), o)
        }
    };
    o.ignore(&["module"]);
    o.expect(
        "registered_name",
        |r| r.is_null() || r.as_str() == Some(class.as_str()),
        "built-in optimizers",
    )?;
    let c = o.obj("config")?;
    c.ignore(&["name", "ema_momentum", "ema_overwrite_frequency"]);
    c.expect("use_ema", |v| v == &Value::Bool(false), "use_ema = false")?;
    c.expect_null("loss_scale_factor", "loss scaling")?;
    c.expect(
        "gradient_accumulation_steps",
        |v| v.is_null() || v.as_u64() == Some(1),
        "no gradient accumulation",
    )?;
    let lr_v = c.required("learning_rate")?;
    // A schedule object: the optimizer is built with the schedule's first rate, then wrapped.
    let schedule = match lr_v {
        Value::Object(_) => Some(schedule(&c.obj("learning_rate")?)?),
        _ => None,
    };
    let lr = match &schedule {
        Some(s) => s.rate(0),
        None => lr_v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| {
            c.error("learning_rate", format!("{} is not supported: kiln takes a positive number or a keras.optimizers.schedules object", short(lr_v)))
        })?,
    };
    let opt_num = |key: &str| -> Result<Option<f64>> {
        match c.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| c.error(key, format!("expected a number, got {}", short(v)))),
        }
    };
    let clip = |mut o: Box<dyn ClipBuilder>| -> Result<Box<dyn Optimizer>> {
        if let Some(x) = opt_num("clipnorm")? {
            o = o.clipnorm_boxed(x);
        }
        if let Some(x) = opt_num("global_clipnorm")? {
            o = o.global_clipnorm_boxed(x);
        }
        if let Some(x) = opt_num("clipvalue")? {
            o = o.clipvalue_boxed(x);
        }
        Ok(o.into_optimizer())
    };
    // Keras never writes exclusions (they are set by a method call), but a hand-edited file
    // may: kiln decays every trainable variable, so it cannot honour one.
    if c.get("exclude_from_weight_decay").is_some() {
        return Err(c.error(
            "exclude_from_weight_decay",
            "kiln applies weight decay to every trainable variable and has no exclusion \
             lists: remove the key (and the decay, or decay all variables)",
        ));
    }
    let wd = opt_num("weight_decay")?;
    let decayed = |o: Box<dyn DecayBuilder>| -> Box<dyn ClipBuilder> {
        match wd {
            Some(w) => o.weight_decay_boxed(w),
            None => o.into_clip(),
        }
    };
    let opt = match class.as_str() {
        "SGD" => clip(decayed(Box::new(
            Sgd::new(lr)
                .momentum(c.f64("momentum")?)
                .nesterov(c.bool("nesterov")?),
        )))?,
        "Adam" => clip(decayed(Box::new(
            Adam::new(lr)
                .beta_1(c.f64("beta_1")?)
                .beta_2(c.f64("beta_2")?)
                .epsilon(c.f64("epsilon")?)
                .amsgrad(c.bool("amsgrad")?),
        )))?,
        "AdamW" => {
            // Keras' AdamW refuses `weight_decay=None`.
            let w = match c.get("weight_decay") {
                None => Some(0.004), // Keras' default, when a hand-written file leaves it out
                Some(_) => wd,
            };
            let w = w.ok_or_else(|| {
                c.error(
                    "weight_decay",
                    "AdamW needs a number (Keras refuses None): write the decay, e.g. 0.004",
                )
            })?;
            clip(Box::new(
                AdamW::new(lr)
                    .weight_decay(w)
                    .beta_1(c.f64("beta_1")?)
                    .beta_2(c.f64("beta_2")?)
                    .epsilon(c.f64("epsilon")?)
                    .amsgrad(c.bool("amsgrad")?),
            ))?
        }
        "RMSprop" => clip(decayed(Box::new(
            RmsProp::new(lr)
                .rho(c.f64("rho")?)
                .momentum(c.f64("momentum")?)
                .epsilon(c.f64("epsilon")?)
                .centered(c.bool("centered")?),
        )))?,
        "Nadam" => clip(decayed(Box::new(
            Nadam::new(lr)
                .beta_1(c.f64("beta_1")?)
                .beta_2(c.f64("beta_2")?)
                .epsilon(c.f64("epsilon")?),
        )))?,
        "Adamax" => clip(decayed(Box::new(
            Adamax::new(lr)
                .beta_1(c.f64("beta_1")?)
                .beta_2(c.f64("beta_2")?)
                .epsilon(c.f64("epsilon")?),
        )))?,
        "Adagrad" => clip(decayed(Box::new(
            Adagrad::new(lr)
                .initial_accumulator_value(c.f64("initial_accumulator_value")?)
                .epsilon(c.f64("epsilon")?),
        )))?,
        "Adadelta" => clip(decayed(Box::new(
            Adadelta::new(lr)
                .rho(c.f64("rho")?)
                .epsilon(c.f64("epsilon")?),
        )))?,
        "Lion" => clip(decayed(Box::new(
            Lion::new(lr)
                .beta_1(c.f64("beta_1")?)
                .beta_2(c.f64("beta_2")?),
        )))?,
        other => {
            let note = if matches!(
                other,
                "Ftrl" | "Lamb" | "Adafactor" | "Muon" | "LossScaleOptimizer"
            ) {
                format!("kiln does not implement Keras' `{other}` yet")
            } else {
                format!("kiln has no optimizer `{other}`")
            };
            return Err(o.error(
                "class_name",
                format!("{note}: use {}", KERAS_OPTIMIZERS.join(", ")),
            ));
        }
    };
    c.finish(&class)?;
    o.finish("an optimizer")?;
    Ok(match schedule {
        Some(s) => Box::new(Scheduled::new(opt, s)),
        None => opt,
    })
}

/// A `keras.optimizers.schedules` object (`{"module", "class_name", "config"}`), every key of
/// its config read (Keras' defaults for the optional ones it may omit), unknown keys refused.
pub(crate) fn schedule(o: &Obj) -> Result<LearningRateSchedule> {
    o.ignore(&["module"]);
    let class = o.str("class_name")?.to_string();
    o.expect(
        "registered_name",
        |r| r.is_null() || r.as_str() == Some(class.as_str()),
        "built-in learning rate schedules",
    )?;
    let c = o.obj("config")?;
    c.ignore(&["name"]);
    let num_or = |key: &str, default: f64| -> Result<f64> {
        match c.get(key) {
            None => Ok(default),
            Some(_) => c.f64(key),
        }
    };
    let numbers = |key: &str| -> Result<Vec<f64>> {
        let v = c.required(key)?;
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_f64().filter(|x| x.is_finite()))
                    .collect()
            })
            .ok_or_else(|| c.error(key, format!("expected a list of numbers, got {}", short(v))))
    };
    let s = match class.as_str() {
        "ExponentialDecay" => LearningRateSchedule::ExponentialDecay {
            initial_learning_rate: c.f64("initial_learning_rate")?,
            decay_steps: c.f64("decay_steps")?,
            decay_rate: c.f64("decay_rate")?,
            staircase: c.bool_or("staircase", false)?,
        },
        "PiecewiseConstantDecay" => LearningRateSchedule::PiecewiseConstantDecay {
            boundaries: numbers("boundaries")?,
            values: numbers("values")?,
        },
        "PolynomialDecay" => LearningRateSchedule::PolynomialDecay {
            initial_learning_rate: c.f64("initial_learning_rate")?,
            decay_steps: c.f64("decay_steps")?,
            end_learning_rate: num_or("end_learning_rate", 0.0001)?,
            power: num_or("power", 1.0)?,
            cycle: c.bool_or("cycle", false)?,
        },
        "InverseTimeDecay" => LearningRateSchedule::InverseTimeDecay {
            initial_learning_rate: c.f64("initial_learning_rate")?,
            decay_steps: c.f64("decay_steps")?,
            decay_rate: c.f64("decay_rate")?,
            staircase: c.bool_or("staircase", false)?,
        },
        "CosineDecay" => LearningRateSchedule::CosineDecay {
            initial_learning_rate: c.f64("initial_learning_rate")?,
            decay_steps: c.f64("decay_steps")?,
            alpha: num_or("alpha", 0.0)?,
            warmup_target: match c.get("warmup_target") {
                None | Some(Value::Null) => None,
                Some(_) => Some(c.f64("warmup_target")?),
            },
            warmup_steps: num_or("warmup_steps", 0.0)?,
        },
        "CosineDecayRestarts" => LearningRateSchedule::CosineDecayRestarts {
            initial_learning_rate: c.f64("initial_learning_rate")?,
            first_decay_steps: c.f64("first_decay_steps")?,
            t_mul: num_or("t_mul", 2.0)?,
            m_mul: num_or("m_mul", 1.0)?,
            alpha: num_or("alpha", 0.0)?,
        },
        other => {
            return Err(o.error(
                "class_name",
                format!(
                    "kiln has no learning rate schedule `{other}`: use ExponentialDecay, \
                     PiecewiseConstantDecay, PolynomialDecay, InverseTimeDecay, CosineDecay or \
                     CosineDecayRestarts"
                ),
            ))
        }
    };
    c.finish(&class)?;
    o.finish("a learning rate schedule")?;
    s.validate().map_err(|e| o.error_here(e))?;
    Ok(s)
}

/// A schedule from its Keras JSON, for tests.
#[cfg(test)]
pub(crate) fn schedule_from_json(v: &Value) -> Result<LearningRateSchedule> {
    schedule(&Obj::new(v, "learning_rate", "test")?)
}

/// The clipping options every kiln optimizer has, behind one object.
trait ClipBuilder {
    fn clipnorm_boxed(self: Box<Self>, c: f64) -> Box<dyn ClipBuilder>;
    fn global_clipnorm_boxed(self: Box<Self>, c: f64) -> Box<dyn ClipBuilder>;
    fn clipvalue_boxed(self: Box<Self>, c: f64) -> Box<dyn ClipBuilder>;
    fn into_optimizer(self: Box<Self>) -> Box<dyn Optimizer>;
}

macro_rules! clip_builder {
    ($($t:ty),*) => {$(
        impl ClipBuilder for $t {
            fn clipnorm_boxed(self: Box<Self>, c: f64) -> Box<dyn ClipBuilder> { Box::new(self.clipnorm(c)) }
            fn global_clipnorm_boxed(self: Box<Self>, c: f64) -> Box<dyn ClipBuilder> { Box::new(self.global_clipnorm(c)) }
            fn clipvalue_boxed(self: Box<Self>, c: f64) -> Box<dyn ClipBuilder> { Box::new(self.clipvalue(c)) }
            fn into_optimizer(self: Box<Self>) -> Box<dyn Optimizer> { self }
        }
    )*};
}
clip_builder!(Sgd, Adam, AdamW, RmsProp, Nadam, Adamax, Adagrad, Adadelta, Lion);

/// The Keras optimizer classes kiln imports and exports.
const KERAS_OPTIMIZERS: &[&str] = &[
    "SGD", "Adam", "AdamW", "RMSprop", "Nadam", "Adamax", "Adagrad", "Adadelta", "Lion",
];

/// Keras' `weight_decay`, which every optimizer but AdamW (always decayed) takes, behind one
/// object.
trait DecayBuilder {
    fn weight_decay_boxed(self: Box<Self>, wd: f64) -> Box<dyn ClipBuilder>;
    fn into_clip(self: Box<Self>) -> Box<dyn ClipBuilder>;
}

macro_rules! decay_builder {
    ($($t:ty),*) => {$(
        impl DecayBuilder for $t {
            fn weight_decay_boxed(self: Box<Self>, wd: f64) -> Box<dyn ClipBuilder> { Box::new(self.weight_decay(wd)) }
            fn into_clip(self: Box<Self>) -> Box<dyn ClipBuilder> { self }
        }
    )*};
}
decay_builder!(Sgd, Adam, RmsProp, Nadam, Adamax, Adagrad, Adadelta, Lion);
