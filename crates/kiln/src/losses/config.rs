//! One strict parser for the parameters of the built-in losses, used by run files, saved
//! `model.json` files and the Keras conformance cases alike.
//!
//! Every parameter's type is checked (a bool must be a bool, a number a number; an integer is
//! fine where a float is expected, as in Keras), every number must be finite and in its range,
//! and unknown keys are errors. Nothing a user wrote is ever replaced by a default: a default is
//! used only for a key that is absent.
//!
//! Where the parameters come from is abstracted by [`Params`], so that every error names the
//! place of the offending value: the file and line of a run file, or the file and key path of a
//! JSON document.

use super::Loss;
use crate::error::{invalid, Error, Result};
use crate::reduction::Reduction;
use std::fmt;
use std::sync::Arc;

/// A parameter value as the user wrote it, whatever the format it came from.
///
/// ```
/// use kiln::losses::config::ParamValue;
/// let v = ParamValue::from_json(&serde_json::json!("0.5"));
/// assert_eq!(v, ParamValue::String("0.5".into()));
/// assert_eq!((v.to_string(), v.kind()), ("\"0.5\"".to_string(), "a string"));
/// assert_eq!(ParamValue::Float(f64::NAN).to_string(), "nan");
/// ```
///
/// # Errors
///
/// None: a plain value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// `true` or `false`.
    Bool(bool),
    /// An integer.
    Integer(i64),
    /// A floating-point number (possibly NaN or infinite: TOML allows `nan` and `inf`).
    Float(f64),
    /// A string.
    String(String),
    /// A list of values.
    List(Vec<ParamValue>),
    /// JSON `null`.
    Null,
    /// A nested table or object (never a valid loss parameter).
    Table,
    /// Anything else (a TOML date, a number that does not fit), described in words.
    Other(String),
}

impl ParamValue {
    /// What kind of value this is, for error messages ("a string", "a float", …).
    pub fn kind(&self) -> &'static str {
        match self {
            ParamValue::Bool(_) => "a bool",
            ParamValue::Integer(_) => "an integer",
            ParamValue::Float(_) => "a float",
            ParamValue::String(_) => "a string",
            ParamValue::List(_) => "a list",
            ParamValue::Null => "null",
            ParamValue::Table => "a table",
            ParamValue::Other(_) => "an unsupported value",
        }
    }

    /// The value from a JSON value.
    pub fn from_json(v: &serde_json::Value) -> ParamValue {
        use serde_json::Value;
        match v {
            Value::Null => ParamValue::Null,
            Value::Bool(b) => ParamValue::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => ParamValue::Integer(i),
                None => match n.as_f64() {
                    Some(f) => ParamValue::Float(f),
                    None => ParamValue::Other(n.to_string()),
                },
            },
            Value::String(s) => ParamValue::String(s.clone()),
            Value::Array(a) => ParamValue::List(a.iter().map(ParamValue::from_json).collect()),
            Value::Object(_) => ParamValue::Table,
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Integer(i) => write!(f, "{i}"),
            ParamValue::Float(x) if x.is_nan() => write!(f, "nan"),
            ParamValue::Float(x) if x.is_infinite() => {
                write!(f, "{}inf", if *x < 0.0 { "-" } else { "" })
            }
            ParamValue::Float(x) => write!(f, "{x:?}"),
            ParamValue::String(s) => write!(f, "{s:?}"),
            ParamValue::List(items) => {
                write!(f, "[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{item}")?;
                }
                write!(f, "]")
            }
            ParamValue::Null => write!(f, "null"),
            ParamValue::Table => write!(f, "{{…}}"),
            ParamValue::Other(s) => write!(f, "{s}"),
        }
    }
}

/// A table of parameters read from somewhere (a run file's TOML table, a JSON object) that can
/// say where each value is, so errors point at it.
///
/// ```
/// use kiln::losses::config::{JsonParams, Params, ParamValue};
/// let config = serde_json::json!({ "delta": 0.5 });
/// let p = JsonParams::new(&config, "model.json compile.loss");
/// assert_eq!(p.keys(), vec!["delta".to_string()]);
/// assert_eq!(p.value("delta"), Some(ParamValue::Float(0.5)));
/// assert!(p.error(Some("delta"), "too small").to_string().contains("model.json compile.loss.delta"));
/// # Ok::<(), kiln::Error>(())
/// ```
///
/// # Errors
///
/// The trait's methods do not fail; [`Params::error`] builds the error to return.
pub trait Params {
    /// Every key of the table, in order.
    fn keys(&self) -> Vec<String>;
    /// The value of `key`, if present.
    fn value(&self, key: &str) -> Option<ParamValue>;
    /// An error about the value of `key` (or, with `None`, about the table as a whole) that
    /// names where it is: the file and line, or the file and key path.
    fn error(&self, key: Option<&str>, msg: &str) -> Error;
}

/// The parameters of a JSON object (a Keras `get_config()`, a saved model's loss), located by a
/// description of the place such as `"cases.json case 3 config"`. `null` counts as no
/// parameters; any other non-object is an error when read.
///
/// ```
/// use kiln::losses::config::{loss_from_config, JsonParams};
/// use kiln::reduction::Reduction;
/// let config = serde_json::json!({ "delta": "0.5" });
/// let err = loss_from_config("huber", &JsonParams::new(&config, "run.json loss"), Reduction::default());
/// let msg = err.err().unwrap().to_string();
/// assert!(msg.contains("run.json loss.delta") && msg.contains("\"0.5\""), "{msg}");
/// ```
///
/// # Errors
///
/// Construction does not fail; see [`loss_from_config`] for the errors of reading.
pub struct JsonParams<'a> {
    value: &'a serde_json::Value,
    place: String,
}

impl<'a> JsonParams<'a> {
    /// Wraps a JSON object; `place` names where it is (file and key path).
    pub fn new(value: &'a serde_json::Value, place: impl Into<String>) -> Self {
        Self {
            value,
            place: place.into(),
        }
    }
}

impl Params for JsonParams<'_> {
    fn keys(&self) -> Vec<String> {
        match self.value {
            serde_json::Value::Object(o) => o.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }
    fn value(&self, key: &str) -> Option<ParamValue> {
        self.value.get(key).map(ParamValue::from_json)
    }
    fn error(&self, key: Option<&str>, msg: &str) -> Error {
        match key {
            Some(k) if self.place.is_empty() => invalid(format!("`{k}`: {msg}")),
            Some(k) => invalid(format!("{}.{k}: {msg}", self.place)),
            None if self.place.is_empty() => invalid(msg.to_string()),
            None => invalid(format!("{}: {msg}", self.place)),
        }
    }
}

/// A closed, open or half-open interval a number must lie in; the number must also be finite
/// unless an end is infinite and [`Bounds::allow_infinite`] says so.
///
/// ```
/// use kiln::losses::config::Bounds;
/// let unit = Bounds::closed(0.0, 1.0);
/// assert!(unit.contains(0.5) && !unit.contains(1.5) && !unit.contains(f64::NAN));
/// assert_eq!(unit.to_string(), "a finite number in [0, 1]");
/// assert!(!Bounds::positive().contains(0.0));
/// assert!(!Bounds::non_negative().contains(f64::INFINITY));
/// ```
///
/// # Errors
///
/// None: [`Bounds::contains`] answers yes or no.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// The lower end.
    pub lo: f64,
    /// Whether the lower end itself is allowed.
    pub lo_inclusive: bool,
    /// The upper end.
    pub hi: f64,
    /// Whether the upper end itself is allowed.
    pub hi_inclusive: bool,
    /// Whether `+inf`/`-inf` are allowed (only where an end is infinite).
    pub infinite: bool,
}

impl Bounds {
    /// Any finite number.
    pub const fn finite() -> Self {
        Self {
            lo: f64::NEG_INFINITY,
            lo_inclusive: false,
            hi: f64::INFINITY,
            hi_inclusive: false,
            infinite: false,
        }
    }
    /// `[lo, hi]`.
    pub const fn closed(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            lo_inclusive: true,
            hi,
            hi_inclusive: true,
            infinite: false,
        }
    }
    /// `[lo, hi)`.
    pub const fn closed_open(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            lo_inclusive: true,
            hi,
            hi_inclusive: false,
            infinite: false,
        }
    }
    /// `(lo, hi)`.
    pub const fn open(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            lo_inclusive: false,
            hi,
            hi_inclusive: false,
            infinite: false,
        }
    }
    /// Finite and `> 0`.
    pub const fn positive() -> Self {
        Self::open(0.0, f64::INFINITY)
    }
    /// Finite and `>= 0`.
    pub const fn non_negative() -> Self {
        Self::closed_open(0.0, f64::INFINITY)
    }
    /// The same interval, with `inf` (or `-inf`) allowed at an infinite end.
    pub const fn allow_infinite(mut self) -> Self {
        self.infinite = true;
        self
    }
    /// Whether `x` lies in the interval (NaN never does).
    pub fn contains(&self, x: f64) -> bool {
        if x.is_nan() || (x.is_infinite() && !self.infinite) {
            return false;
        }
        let above = if self.lo_inclusive || x.is_infinite() {
            x >= self.lo
        } else {
            x > self.lo
        };
        let below = if self.hi_inclusive || x.is_infinite() {
            x <= self.hi
        } else {
            x < self.hi
        };
        above && below
    }
}

impl fmt::Display for Bounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.infinite {
            "a number (inf allowed)"
        } else {
            "a finite number"
        };
        let num = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                format!("{}", x as i64)
            } else {
                format!("{x}")
            }
        };
        match (self.lo.is_finite(), self.hi.is_finite()) {
            (false, false) => write!(f, "{what}"),
            (true, false) => {
                write!(
                    f,
                    "{what} {} {}",
                    if self.lo_inclusive { ">=" } else { ">" },
                    num(self.lo)
                )
            }
            (false, true) => {
                write!(
                    f,
                    "{what} {} {}",
                    if self.hi_inclusive { "<=" } else { "<" },
                    num(self.hi)
                )
            }
            (true, true) => write!(
                f,
                "{what} in {}{}, {}{}",
                if self.lo_inclusive { "[" } else { "(" },
                num(self.lo),
                num(self.hi),
                if self.hi_inclusive { "]" } else { ")" }
            ),
        }
    }
}

/// Typed, strict reading of one loss's (or regularizer's) parameters.
pub(crate) struct Reader<'p> {
    params: &'p dyn Params,
    owner: &'p str,
}

impl<'p> Reader<'p> {
    pub(crate) fn new(params: &'p dyn Params, owner: &'p str) -> Self {
        Self { params, owner }
    }

    fn bad(&self, key: &str, v: &ParamValue, allowed: &str) -> Error {
        let got = match v {
            ParamValue::Float(x) if !x.is_finite() => format!("got {v}"),
            _ => format!("got {v} ({})", v.kind()),
        };
        self.params.error(
            Some(key),
            &format!("{got}; {}'s `{key}` must be {allowed}", self.owner),
        )
    }

    /// Fails on any key not in `allowed`.
    pub(crate) fn only(&self, allowed: &[&str]) -> Result<()> {
        if let Some(k) = self
            .params
            .keys()
            .into_iter()
            .find(|k| !allowed.contains(&k.as_str()))
        {
            let takes = if allowed.is_empty() {
                "it takes no parameters".to_string()
            } else {
                format!("it takes only {}", allowed.join(", "))
            };
            return Err(self.params.error(
                Some(&k),
                &format!("{} has no parameter `{k}`: {takes}", self.owner),
            ));
        }
        Ok(())
    }

    /// A number in `bounds`, or `default` when absent.
    pub(crate) fn float(&self, key: &str, default: f64, bounds: Bounds) -> Result<f64> {
        let Some(v) = self.params.value(key) else {
            return Ok(default);
        };
        let x = match v {
            ParamValue::Integer(i) => i as f64,
            ParamValue::Float(x) => x,
            _ => return Err(self.bad(key, &v, &bounds.to_string())),
        };
        if !bounds.contains(x) {
            return Err(self.bad(key, &v, &bounds.to_string()));
        }
        Ok(x)
    }

    /// `true` or `false`, or `default` when absent.
    pub(crate) fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.params.value(key) {
            None => Ok(default),
            Some(ParamValue::Bool(b)) => Ok(b),
            Some(v) => Err(self.bad(key, &v, "true or false")),
        }
    }

    /// An integer, `null` or absent.
    pub(crate) fn optional_int(&self, key: &str) -> Result<Option<i64>> {
        match self.params.value(key) {
            None | Some(ParamValue::Null) => Ok(None),
            Some(ParamValue::Integer(i)) => Ok(Some(i)),
            Some(v) => Err(self.bad(key, &v, "an integer or null")),
        }
    }

    /// An integer axis (default -1).
    pub(crate) fn axis(&self) -> Result<isize> {
        match self.params.value("axis") {
            None => Ok(-1),
            Some(ParamValue::Integer(i)) => Ok(i as isize),
            Some(v) => Err(self.bad("axis", &v, "an integer")),
        }
    }

    /// An axis, a list of axes, or null/absent (all but the batch axis).
    pub(crate) fn axes(&self) -> Result<Option<Vec<isize>>> {
        let allowed = "an integer, a list of integers or null";
        match self.params.value("axis") {
            None | Some(ParamValue::Null) => Ok(None),
            Some(ParamValue::Integer(i)) => Ok(Some(vec![i as isize])),
            Some(ParamValue::List(items)) => items
                .iter()
                .map(|i| match i {
                    ParamValue::Integer(a) => Ok(*a as isize),
                    other => Err(self.bad("axis", other, allowed)),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.bad("axis", &v, allowed)),
        }
    }

    /// A string, or `default` when absent.
    pub(crate) fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.params.value(key) {
            None => Ok(default.to_string()),
            Some(ParamValue::String(s)) => Ok(s),
            Some(v) => Err(self.bad(key, &v, "a string")),
        }
    }
}

/// The label smoothing of the crossentropies: Keras documents it as a float in `[0, 1]`.
const SMOOTHING: Bounds = Bounds::closed(0.0, 1.0);
/// The focusing parameter of the focal losses: `(1 - p)^gamma` needs `gamma >= 0`.
const GAMMA: Bounds = Bounds::non_negative();

/// What one loss parameter allows.
///
/// ```
/// use kiln::losses::config::{Allowed, Bounds};
/// assert_eq!(Allowed::Number(Bounds::closed(0.0, 1.0)).to_string(), "a finite number in [0, 1]");
/// assert_eq!(Allowed::Bool.to_string(), "true or false");
/// ```
///
/// # Errors
///
/// None: a description.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Allowed {
    /// A number (an integer is fine) in the bounds.
    Number(Bounds),
    /// `true` or `false`.
    Bool,
    /// An integer axis.
    Axis,
    /// An integer axis, a list of them, or null.
    Axes,
    /// An integer or null.
    IntOrNull,
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowed::Number(b) => write!(f, "{b}"),
            Allowed::Bool => write!(f, "true or false"),
            Allowed::Axis => write!(f, "an integer"),
            Allowed::Axes => write!(f, "an integer, a list of integers or null"),
            Allowed::IntOrNull => write!(f, "an integer or null"),
        }
    }
}

use Allowed::{Axes, Axis, Bool, IntOrNull, Number};

/// The parameters each built-in loss takes, by Keras class name, with what each allows: the
/// one table the parser, `kiln losses` and the tests read.
///
/// ```
/// use kiln::losses::config::{Allowed, Bounds, PARAMETERS};
/// let huber = PARAMETERS.iter().find(|(l, _)| *l == "Huber").unwrap();
/// assert_eq!(huber.1, &[("delta", Allowed::Number(Bounds::positive()))]);
/// ```
///
/// # Errors
///
/// None: a constant.
pub const PARAMETERS: &[(&str, &[(&str, Allowed)])] = &[
    ("MeanSquaredError", &[]),
    ("MeanAbsoluteError", &[]),
    ("MeanAbsolutePercentageError", &[]),
    ("MeanSquaredLogarithmicError", &[]),
    ("LogCosh", &[]),
    // delta = 0 makes the loss identically zero.
    ("Huber", &[("delta", Number(Bounds::positive()))]),
    (
        "BinaryCrossentropy",
        &[
            ("from_logits", Bool),
            ("label_smoothing", Number(SMOOTHING)),
            ("axis", Axis),
        ],
    ),
    (
        "BinaryFocalCrossentropy",
        &[
            ("apply_class_balancing", Bool),
            // alpha weighs the positives and 1 - alpha the negatives.
            ("alpha", Number(Bounds::closed(0.0, 1.0))),
            ("gamma", Number(GAMMA)),
            ("from_logits", Bool),
            ("label_smoothing", Number(SMOOTHING)),
            ("axis", Axis),
        ],
    ),
    (
        "CategoricalCrossentropy",
        &[
            ("from_logits", Bool),
            ("label_smoothing", Number(SMOOTHING)),
            ("axis", Axis),
        ],
    ),
    (
        "CategoricalFocalCrossentropy",
        &[
            // A scale of every class's term: negative would turn the loss upside down.
            ("alpha", Number(Bounds::non_negative())),
            ("gamma", Number(GAMMA)),
            ("from_logits", Bool),
            ("label_smoothing", Number(SMOOTHING)),
            ("axis", Axis),
        ],
    ),
    (
        "SparseCategoricalCrossentropy",
        &[
            ("from_logits", Bool),
            ("ignore_class", IntOrNull),
            ("axis", Axis),
        ],
    ),
    ("Hinge", &[]),
    ("SquaredHinge", &[]),
    ("CategoricalHinge", &[]),
    ("KLDivergence", &[]),
    ("Poisson", &[]),
    ("CosineSimilarity", &[("axis", Axis)]),
    ("Dice", &[("axis", Axes)]),
    (
        "Tversky",
        &[
            ("alpha", Number(Bounds::non_negative())),
            ("beta", Number(Bounds::non_negative())),
            ("axis", Axes),
        ],
    ),
    (
        "Circle",
        &[
            // The scale of the similarities: 0 makes the loss a constant.
            ("gamma", Number(Bounds::positive())),
            ("margin", Number(Bounds::finite())),
            ("remove_diagonal", Bool),
        ],
    ),
    // Keras: "q: float in (0, 1)".
    (
        "CategoricalGeneralizedCrossEntropy",
        &[("q", Number(Bounds::open(0.0, 1.0)))],
    ),
    ("CTC", &[]),
];

/// The bounds of a numeric parameter of a loss, from [`PARAMETERS`].
fn bounds_of(class: &str, key: &str) -> Bounds {
    PARAMETERS
        .iter()
        .find(|(c, _)| *c == class)
        .and_then(|(_, ps)| ps.iter().find(|(k, _)| *k == key))
        .and_then(|(_, a)| match a {
            Number(b) => Some(*b),
            _ => None,
        })
        .expect("every numeric parameter is in PARAMETERS")
}

/// Builds a built-in loss from its name (Keras class name such as `Huber`, or the snake-case
/// name or alias of a run file such as `huber` or `bce`) and its parameters, checking each
/// parameter's type and range and refusing unknown keys. Absent keys take Keras' defaults;
/// present ones are never replaced.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::config::{loss_from_config, JsonParams};
/// use kiln::reduction::Reduction;
/// let config = serde_json::json!({ "delta": 0.5 });
/// let huber = loss_from_config("huber", &JsonParams::new(&config, "config"), Reduction::default())?;
/// let t = Tensor::new(&[[0f32]], &Device::Cpu)?;
/// let p = Tensor::new(&[[2f32]], &Device::Cpu)?;
/// // |e| = 2 > delta: delta * (|e| - delta / 2) = 0.5 * 1.75
/// assert_eq!(huber.per_sample(&t, &p)?.to_vec1::<f32>()?, vec![0.875]);
/// let nan = serde_json::json!({ "delta": -1 });
/// assert!(loss_from_config("Huber", &JsonParams::new(&nan, "config"), Reduction::default()).is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidArgument`] naming the place of the value (via [`Params::error`]), the key,
/// the value and what is allowed, when a parameter has the wrong type, is NaN or infinite, is
/// out of range or is not a parameter of the loss; and when the loss is unknown.
pub fn loss_from_config(
    name: &str,
    params: &dyn Params,
    reduction: Reduction,
) -> Result<Arc<dyn Loss>> {
    use super::*;
    let class = keras_class_name(name).ok_or_else(|| {
        params.error(
            None,
            &format!("unknown loss `{name}` (`kiln losses` lists them all)"),
        )
    })?;
    let r = Reader::new(params, class);
    let allowed: Vec<&str> = PARAMETERS
        .iter()
        .find(|(c, _)| *c == class)
        .map(|(_, p)| p.iter().map(|(k, _)| *k).collect())
        .unwrap_or_default();
    r.only(&allowed)?;
    let num = |key: &str| bounds_of(class, key);
    let loss: Arc<dyn Loss> = match class {
        "MeanSquaredError" => Arc::new(MeanSquaredError::new().with_reduction(reduction)),
        "MeanAbsoluteError" => Arc::new(MeanAbsoluteError::new().with_reduction(reduction)),
        "MeanAbsolutePercentageError" => {
            Arc::new(MeanAbsolutePercentageError::new().with_reduction(reduction))
        }
        "MeanSquaredLogarithmicError" => {
            Arc::new(MeanSquaredLogarithmicError::new().with_reduction(reduction))
        }
        "LogCosh" => Arc::new(LogCosh::new().with_reduction(reduction)),
        "Huber" => Arc::new(
            Huber::new()
                .delta(r.float("delta", 1.0, num("delta"))?)
                .with_reduction(reduction),
        ),
        "BinaryCrossentropy" => Arc::new(
            BinaryCrossentropy::new()
                .from_logits(r.bool("from_logits", false)?)
                .label_smoothing(r.float("label_smoothing", 0.0, num("label_smoothing"))?)
                .axis(r.axis()?)
                .with_reduction(reduction),
        ),
        "BinaryFocalCrossentropy" => Arc::new(
            BinaryFocalCrossentropy::new()
                .apply_class_balancing(r.bool("apply_class_balancing", false)?)
                .alpha(r.float("alpha", 0.25, num("alpha"))?)
                .gamma(r.float("gamma", 2.0, num("gamma"))?)
                .from_logits(r.bool("from_logits", false)?)
                .label_smoothing(r.float("label_smoothing", 0.0, num("label_smoothing"))?)
                .axis(r.axis()?)
                .with_reduction(reduction),
        ),
        "CategoricalCrossentropy" => Arc::new(
            CategoricalCrossentropy::new()
                .from_logits(r.bool("from_logits", false)?)
                .label_smoothing(r.float("label_smoothing", 0.0, num("label_smoothing"))?)
                .axis(r.axis()?)
                .with_reduction(reduction),
        ),
        "CategoricalFocalCrossentropy" => Arc::new(
            CategoricalFocalCrossentropy::new()
                .alpha(r.float("alpha", 0.25, num("alpha"))?)
                .gamma(r.float("gamma", 2.0, num("gamma"))?)
                .from_logits(r.bool("from_logits", false)?)
                .label_smoothing(r.float("label_smoothing", 0.0, num("label_smoothing"))?)
                .axis(r.axis()?)
                .with_reduction(reduction),
        ),
        "SparseCategoricalCrossentropy" => {
            let axis = r.axis()?;
            if axis != -1 {
                return Err(params.error(
                    Some("axis"),
                    &format!("got {axis}; SparseCategoricalCrossentropy supports axis = -1 only"),
                ));
            }
            Arc::new(
                SparseCategoricalCrossentropy::new()
                    .from_logits(r.bool("from_logits", false)?)
                    .ignore_class(r.optional_int("ignore_class")?)
                    .with_reduction(reduction),
            )
        }
        "Hinge" => Arc::new(Hinge::new().with_reduction(reduction)),
        "SquaredHinge" => Arc::new(SquaredHinge::new().with_reduction(reduction)),
        "CategoricalHinge" => Arc::new(CategoricalHinge::new().with_reduction(reduction)),
        "KLDivergence" => Arc::new(KLDivergence::new().with_reduction(reduction)),
        "Poisson" => Arc::new(Poisson::new().with_reduction(reduction)),
        "CosineSimilarity" => Arc::new(
            CosineSimilarity::new()
                .axis(r.axis()?)
                .with_reduction(reduction),
        ),
        "Dice" => Arc::new(Dice::new().axis(r.axes()?).with_reduction(reduction)),
        "Tversky" => Arc::new(
            Tversky::new()
                .alpha(r.float("alpha", 0.5, num("alpha"))?)
                .beta(r.float("beta", 0.5, num("beta"))?)
                .axis(r.axes()?)
                .with_reduction(reduction),
        ),
        "Circle" => Arc::new(
            Circle::new()
                .gamma(r.float("gamma", 80.0, num("gamma"))?)
                .margin(r.float("margin", 0.4, num("margin"))?)
                .remove_diagonal(r.bool("remove_diagonal", true)?)
                .with_reduction(reduction),
        ),
        "CategoricalGeneralizedCrossEntropy" => Arc::new(
            CategoricalGeneralizedCrossEntropy::new()
                .q(r.float("q", 0.5, num("q"))?)
                .with_reduction(reduction),
        ),
        "CTC" => Arc::new(Ctc::new().with_reduction(reduction)),
        other => {
            return Err(params.error(None, &format!("kiln has no loss `{other}`")));
        }
    };
    loss.validate()
        .map_err(|e| params.error(None, &e.to_string()))?;
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(name: &str, config: serde_json::Value) -> Result<Arc<dyn Loss>> {
        loss_from_config(
            name,
            &JsonParams::new(&config, "t.json loss"),
            Reduction::default(),
        )
    }

    #[test]
    fn wrong_types_and_ranges_are_errors_naming_the_key() {
        use serde_json::json;
        for (name, config, key) in [
            ("Huber", json!({"delta": "0.5"}), "delta"),
            ("Huber", json!({"delta": 0}), "delta"),
            ("Huber", json!({"delta": true}), "delta"),
            (
                "BinaryCrossentropy",
                json!({"from_logits": "true"}),
                "from_logits",
            ),
            (
                "BinaryCrossentropy",
                json!({"from_logits": 1.0}),
                "from_logits",
            ),
            (
                "BinaryCrossentropy",
                json!({"label_smoothing": 1.5}),
                "label_smoothing",
            ),
            ("BinaryFocalCrossentropy", json!({"gamma": -1}), "gamma"),
            ("BinaryFocalCrossentropy", json!({"alpha": 2}), "alpha"),
            ("CategoricalGeneralizedCrossEntropy", json!({"q": 1}), "q"),
            ("Tversky", json!({"axis": "1"}), "axis"),
            (
                "SparseCategoricalCrossentropy",
                json!({"ignore_class": 1.5}),
                "ignore_class",
            ),
            ("MeanSquaredError", json!({"delta": 1}), "delta"),
        ] {
            let msg = build(name, config.clone()).err().map(|e| e.to_string());
            let msg = msg.unwrap_or_else(|| panic!("{name} {config} accepted"));
            assert!(msg.contains(&format!("t.json loss.{key}")), "{msg}");
        }
    }

    #[test]
    fn integers_are_fine_where_floats_are_expected() {
        assert!(build("Huber", serde_json::json!({"delta": 2})).is_ok());
        assert!(build("Huber", serde_json::Value::Null).is_ok());
    }

    #[test]
    fn bounds_describe_themselves() {
        assert_eq!(Bounds::positive().to_string(), "a finite number > 0");
        assert_eq!(
            Bounds::open(0.0, 1.0).to_string(),
            "a finite number in (0, 1)"
        );
        assert!(Bounds::positive().allow_infinite().contains(f64::INFINITY));
        assert!(!Bounds::positive()
            .allow_infinite()
            .contains(f64::NEG_INFINITY));
        assert!(!Bounds::positive().allow_infinite().contains(f64::NAN));
    }
}
