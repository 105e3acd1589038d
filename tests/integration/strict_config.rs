//! Nothing silently wrong: every bad value a run file can hold (wrong type, NaN, infinity,
//! negative, out of range) for the losses, optimizers, layers, fit and data is an error that
//! names the file, the line and the key; good values build what they say; models too large for
//! the machine are refused before allocating.
//!
//! With `KILN_STRICT_COUNT=1` the table-driven test only counts how many bad values are
//! accepted (to measure a version of kiln without these checks) instead of failing.

use candle_core::{Device, Tensor};
use kiln::run::{RunFile, TrainOptions};
use proptest::prelude::*;
use std::path::PathBuf;

/// The run file every case edits; `{ADDED}` is line 1, `{DATA}` line 6, `{LAYER}` line 9,
/// `{OPT}` line 13, `{LOSS}` line 14 and `{FIT}` line 17.
const TEMPLATE: &str = r#"{ADDED}
seed = 0
[data]
source = "blobs"
samples = 40
{DATA}
[model]
layers = [
  {LAYER},
  { type = "dense", name = "out", units = 1 },
]
[compile]
optimizer = {OPT}
loss = {LOSS}
[fit]
# the [fit] key under test is on the next line
{FIT}"#;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    Added,
    Data,
    Layer,
    Opt,
    Loss,
    Fit,
}

impl Slot {
    fn line(self) -> usize {
        match self {
            Slot::Added => 1,
            Slot::Data => 6,
            Slot::Layer => 9,
            Slot::Opt => 13,
            Slot::Loss => 14,
            Slot::Fit => 17,
        }
    }
}

fn run_text(slot: Slot, text: &str) -> String {
    let fill = |s: Slot, default: &str| {
        if s == slot {
            text.to_string()
        } else {
            default.into()
        }
    };
    TEMPLATE
        .replace("{ADDED}", &fill(Slot::Added, ""))
        .replace("{DATA}", &fill(Slot::Data, ""))
        .replace(
            "{LAYER}",
            &fill(
                Slot::Layer,
                r#"{ type = "dense", name = "hidden", units = 4 }"#,
            ),
        )
        .replace("{OPT}", &fill(Slot::Opt, r#""sgd""#))
        .replace("{LOSS}", &fill(Slot::Loss, r#""mse""#))
        .replace("{FIT}", &fill(Slot::Fit, ""))
}

/// What a key allows, written out here as the specification (independent of kiln's tables).
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// A finite number in the interval (lo, lo inclusive, hi, hi inclusive).
    Num(f64, bool, f64, bool),
    /// An integer >= the minimum.
    Int(i64),
    /// Any integer (an axis).
    AnyInt,
    /// Exactly this integer.
    Exactly(i64),
    /// One of these integers (the feature axes of an input).
    OneOf(&'static [i64]),
    /// true or false.
    Bool,
}

const POS: Expect = Expect::Num(0.0, false, f64::INFINITY, false);
const NON_NEG: Expect = Expect::Num(0.0, true, f64::INFINITY, false);
const UNIT: Expect = Expect::Num(0.0, true, 1.0, true);
const UNIT_OPEN: Expect = Expect::Num(0.0, true, 1.0, false);
/// Lion's `beta_1`: Keras refuses 0 (SignSGD) and anything above 1.
const LION_BETA_1: Expect = Expect::Num(0.0, false, 1.0, true);
const FINITE: Expect = Expect::Num(f64::NEG_INFINITY, false, f64::INFINITY, false);

impl Expect {
    fn allows_number(self, x: f64) -> bool {
        match self {
            Expect::Num(lo, li, hi, hi_inc) => {
                x.is_finite()
                    && (if li { x >= lo } else { x > lo })
                    && (if hi_inc { x <= hi } else { x < hi })
            }
            _ => false,
        }
    }
    fn allows_integer(self, i: i64) -> bool {
        match self {
            Expect::Num(..) => self.allows_number(i as f64),
            Expect::Int(min) => i >= min,
            Expect::AnyInt => true,
            Expect::Exactly(n) => i == n,
            Expect::OneOf(set) => set.contains(&i),
            Expect::Bool => false,
        }
    }

    /// (TOML text, allowed) for every value the table-driven test feeds.
    fn candidates(self) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = vec![
            ("\"0.5\"".into(), false),
            ("\"true\"".into(), false),
            ("nan".into(), false),
            ("inf".into(), false),
            ("-inf".into(), false),
        ];
        match self {
            Expect::Bool => {
                out.extend([
                    ("1".into(), false),
                    ("1.0".into(), false),
                    ("true".into(), true),
                    ("false".into(), true),
                ]);
            }
            Expect::Num(..) => {
                out.push(("true".into(), false));
                for x in [-1.5, 0.0, 0.5, 1.0, 1.5, 1e9] {
                    out.push((format!("{x:?}"), self.allows_number(x)));
                }
                out.push(("2".into(), self.allows_integer(2)));
            }
            _ => {
                out.push(("true".into(), false));
                out.push(("1.5".into(), false));
                for i in [-2i64, -1, 0, 1, 3] {
                    out.push((i.to_string(), self.allows_integer(i)));
                }
            }
        }
        out
    }
}

/// (slot, the slot's text with `{v}` for the value, key, what it allows, whether accepted
/// values must also build: layers that need another input shape cannot).
type Case = (Slot, &'static str, &'static str, Expect, bool);

fn loss_cases() -> Vec<Case> {
    use Expect::*;
    vec![
        (
            Slot::Loss,
            r#"{ type = "huber", delta = {v} }"#,
            "delta",
            POS,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "binary_crossentropy", from_logits = {v} }"#,
            "from_logits",
            Bool,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "binary_crossentropy", label_smoothing = {v} }"#,
            "label_smoothing",
            UNIT,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "binary_crossentropy", axis = {v} }"#,
            "axis",
            AnyInt,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "binary_focal_crossentropy", apply_class_balancing = {v} }"#,
            "apply_class_balancing",
            Bool,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "binary_focal_crossentropy", alpha = {v} }"#,
            "alpha",
            UNIT,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "binary_focal_crossentropy", gamma = {v} }"#,
            "gamma",
            NON_NEG,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "binary_focal_crossentropy", from_logits = {v} }"#,
            "from_logits",
            Bool,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "binary_focal_crossentropy", label_smoothing = {v} }"#,
            "label_smoothing",
            UNIT,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "binary_focal_crossentropy", axis = {v} }"#,
            "axis",
            AnyInt,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "categorical_crossentropy", from_logits = {v} }"#,
            "from_logits",
            Bool,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "categorical_crossentropy", label_smoothing = {v} }"#,
            "label_smoothing",
            UNIT,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "categorical_crossentropy", axis = {v} }"#,
            "axis",
            AnyInt,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "categorical_focal_crossentropy", alpha = {v} }"#,
            "alpha",
            NON_NEG,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "categorical_focal_crossentropy", gamma = {v} }"#,
            "gamma",
            NON_NEG,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "categorical_focal_crossentropy", from_logits = {v} }"#,
            "from_logits",
            Bool,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "categorical_focal_crossentropy", label_smoothing = {v} }"#,
            "label_smoothing",
            UNIT,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "categorical_focal_crossentropy", axis = {v} }"#,
            "axis",
            AnyInt,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "sparse_categorical_crossentropy", from_logits = {v} }"#,
            "from_logits",
            Bool,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "sparse_categorical_crossentropy", ignore_class = {v} }"#,
            "ignore_class",
            AnyInt,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "sparse_categorical_crossentropy", axis = {v} }"#,
            "axis",
            Exactly(-1),
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "cosine_similarity", axis = {v} }"#,
            "axis",
            AnyInt,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "dice", axis = {v} }"#,
            "axis",
            AnyInt,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "tversky", alpha = {v} }"#,
            "alpha",
            NON_NEG,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "tversky", beta = {v} }"#,
            "beta",
            NON_NEG,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "tversky", axis = {v} }"#,
            "axis",
            AnyInt,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "circle", gamma = {v} }"#,
            "gamma",
            POS,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "circle", margin = {v} }"#,
            "margin",
            FINITE,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "circle", remove_diagonal = {v} }"#,
            "remove_diagonal",
            Bool,
            true,
        ),
        (
            Slot::Loss,
            r#"{ type = "categorical_generalized_cross_entropy", q = {v} }"#,
            "q",
            Num(0.0, false, 1.0, false),
            true,
        ),
    ]
}

fn other_cases() -> Vec<Case> {
    use Expect::*;
    vec![
        // Optimizers.
        (
            Slot::Opt,
            r#"{ type = "adam", learning_rate = {v} }"#,
            "learning_rate",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adam", beta_1 = {v} }"#,
            "beta_1",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adam", beta_2 = {v} }"#,
            "beta_2",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adam", epsilon = {v} }"#,
            "epsilon",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adam", weight_decay = {v} }"#,
            "weight_decay",
            NON_NEG,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adam", clipnorm = {v} }"#,
            "clipnorm",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adam", clipvalue = {v} }"#,
            "clipvalue",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adam", global_clipnorm = {v} }"#,
            "global_clipnorm",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adamw", weight_decay = {v} }"#,
            "weight_decay",
            NON_NEG,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adamw", beta_1 = {v} }"#,
            "beta_1",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "nadam", beta_1 = {v} }"#,
            "beta_1",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "nadam", beta_2 = {v} }"#,
            "beta_2",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "nadam", epsilon = {v} }"#,
            "epsilon",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "nadam", weight_decay = {v} }"#,
            "weight_decay",
            NON_NEG,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adamax", beta_1 = {v} }"#,
            "beta_1",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adamax", beta_2 = {v} }"#,
            "beta_2",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adamax", epsilon = {v} }"#,
            "epsilon",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adagrad", initial_accumulator_value = {v} }"#,
            "initial_accumulator_value",
            NON_NEG,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adagrad", epsilon = {v} }"#,
            "epsilon",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adagrad", weight_decay = {v} }"#,
            "weight_decay",
            NON_NEG,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adadelta", rho = {v} }"#,
            "rho",
            UNIT,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adadelta", epsilon = {v} }"#,
            "epsilon",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "lion", beta_1 = {v} }"#,
            "beta_1",
            LION_BETA_1,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "lion", beta_2 = {v} }"#,
            "beta_2",
            UNIT,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "lion", weight_decay = {v} }"#,
            "weight_decay",
            NON_NEG,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "sgd", weight_decay = {v} }"#,
            "weight_decay",
            NON_NEG,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "rmsprop", weight_decay = {v} }"#,
            "weight_decay",
            NON_NEG,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adam", amsgrad = {v} }"#,
            "amsgrad",
            Expect::Bool,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "adamw", amsgrad = {v} }"#,
            "amsgrad",
            Expect::Bool,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "sgd", learning_rate = {v} }"#,
            "learning_rate",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "sgd", momentum = {v} }"#,
            "momentum",
            UNIT,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "sgd", nesterov = {v} }"#,
            "nesterov",
            Bool,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "rmsprop", rho = {v} }"#,
            "rho",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "rmsprop", momentum = {v} }"#,
            "momentum",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "rmsprop", epsilon = {v} }"#,
            "epsilon",
            POS,
            true,
        ),
        (
            Slot::Opt,
            r#"{ type = "rmsprop", centered = {v} }"#,
            "centered",
            Bool,
            true,
        ),
        // Layers and regularizers.
        (
            Slot::Layer,
            r#"{ type = "dense", units = {v} }"#,
            "units",
            Int(1),
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "dense", units = 2, use_bias = {v} }"#,
            "use_bias",
            Bool,
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "dense", units = 2, kernel_regularizer = { l2 = {v} } }"#,
            "l2",
            NON_NEG,
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "dense", units = 2, kernel_regularizer = { l1 = {v} } }"#,
            "l1",
            NON_NEG,
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "dense", units = 2, bias_regularizer = { orthogonal = {v} } }"#,
            "orthogonal",
            NON_NEG,
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "dropout", rate = {v} }"#,
            "rate",
            UNIT_OPEN,
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "batch_normalization", momentum = {v} }"#,
            "momentum",
            UNIT,
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "batch_normalization", epsilon = {v} }"#,
            "epsilon",
            POS,
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "batch_normalization", center = {v} }"#,
            "center",
            Bool,
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "batch_normalization", synchronized = {v} }"#,
            "synchronized",
            Bool,
            true,
        ),
        // The feature axes of the blobs' [batch, 2] input: 1 and -1.
        (
            Slot::Layer,
            r#"{ type = "batch_normalization", axis = {v} }"#,
            "axis",
            OneOf(&[1, -1]),
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "layer_normalization", axes = {v} }"#,
            "axes",
            OneOf(&[1, -1]),
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "layer_normalization", axes = [{v}] }"#,
            "axes",
            OneOf(&[1, -1]),
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "layer_normalization", axes = [1, {v}] }"#,
            "axes",
            OneOf(&[]),
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "conv1d", filters = 4, kernel_size = 1, groups = {v} }"#,
            "groups",
            Int(1),
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "lstm", units = 2, dropout = {v} }"#,
            "dropout",
            UNIT_OPEN,
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "gru", units = 2, dropout = {v} }"#,
            "dropout",
            UNIT_OPEN,
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "layer_normalization", epsilon = {v} }"#,
            "epsilon",
            POS,
            true,
        ),
        (
            Slot::Layer,
            r#"{ type = "conv1d", kernel_size = 1, filters = {v} }"#,
            "filters",
            Int(1),
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "conv1d", filters = 2, kernel_size = 1, dilation_rate = {v} }"#,
            "dilation_rate",
            Int(1),
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "embedding", output_dim = 2, input_dim = {v} }"#,
            "input_dim",
            Int(1),
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "embedding", input_dim = 2, output_dim = {v} }"#,
            "output_dim",
            Int(1),
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "lstm", units = {v} }"#,
            "units",
            Int(1),
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "gru", units = {v} }"#,
            "units",
            Int(1),
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "lstm", units = 2, dropout = {v} }"#,
            "dropout",
            UNIT_OPEN,
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "gru", units = 2, dropout = {v} }"#,
            "dropout",
            UNIT_OPEN,
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "max_pooling1d", pool_size = {v} }"#,
            "pool_size",
            Int(1),
            false,
        ),
        (
            Slot::Layer,
            r#"{ type = "masking", mask_value = {v} }"#,
            "mask_value",
            FINITE,
            true,
        ),
        // Fit and data.
        (Slot::Fit, "batch_size = {v}", "batch_size", Int(1), false),
        (Slot::Fit, "epochs = {v}", "epochs", Int(0), false),
        (
            Slot::Fit,
            "validation_split = {v}",
            "validation_split",
            UNIT_OPEN,
            false,
        ),
        (Slot::Fit, "shuffle = {v}", "shuffle", Bool, false),
        (
            Slot::Fit,
            "gradient_diagnostics = {v}",
            "gradient_diagnostics",
            Bool,
            false,
        ),
        (
            Slot::Fit,
            "validation_gradient_diagnostics = {v}",
            "validation_gradient_diagnostics",
            Bool,
            false,
        ),
        (
            Slot::Fit,
            "class_weight = { \"0\" = {v}, \"1\" = 1.0, \"2\" = 1.0 }",
            "class_weight",
            NON_NEG,
            false,
        ),
        (
            Slot::Fit,
            "callbacks = [{ type = \"lr_schedule\", initial = {v} }]",
            "initial",
            POS,
            false,
        ),
        (
            Slot::Fit,
            "callbacks = [{ type = \"lr_schedule\", initial = 0.1, every = {v} }]",
            "every",
            Int(1),
            false,
        ),
        (
            Slot::Fit,
            "callbacks = [{ type = \"reduce_lr_on_plateau\", factor = {v} }]",
            "factor",
            Num(0.0, false, 1.0, false),
            false,
        ),
        (
            Slot::Fit,
            "callbacks = [{ type = \"reduce_lr_on_plateau\", min_lr = {v} }]",
            "min_lr",
            NON_NEG,
            false,
        ),
        // Added terms.
        (
            Slot::Added,
            r#"added = [{ kind = "fgsm", epsilon = {v} }]"#,
            "epsilon",
            POS,
            true,
        ),
        (
            Slot::Added,
            r#"added = [{ kind = "pgd", epsilon = 0.1, steps = {v} }]"#,
            "steps",
            Int(1),
            true,
        ),
        (
            Slot::Added,
            r#"added = [{ kind = "pgd", epsilon = 0.1, step_size = {v} }]"#,
            "step_size",
            POS,
            true,
        ),
        (
            Slot::Added,
            r#"added = [{ kind = "fgsm", epsilon = 0.1, multiplier = {v} }]"#,
            "multiplier",
            FINITE,
            false,
        ),
        (
            Slot::Added,
            r#"added = [{ kind = "mean_abs", of = "hidden", factor = {v} }]"#,
            "factor",
            FINITE,
            true,
        ),
        (
            Slot::Data,
            "test_split = {v}",
            "test_split",
            UNIT_OPEN,
            true,
        ),
        (Slot::Data, "imbalance = {v}", "imbalance", FINITE, false),
    ]
}

fn temp(name: &str) -> std::path::PathBuf {
    crate::support::temp("strict", name)
}

/// Builds (and, for `[fit]` cases, trains) a run file; the error message if it fails.
fn outcome(slot: Slot, text: &str, out: &std::path::Path) -> Result<(), String> {
    let run = RunFile::from_text("strict.toml", text, PathBuf::new()).map_err(|e| e.to_string())?;
    if slot == Slot::Fit {
        let options = TrainOptions {
            out: out.to_path_buf(),
            ..Default::default()
        };
        run.train(&options).map(|_| ()).map_err(|e| e.to_string())
    } else {
        run.prepare(None, &Device::Cpu)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[test]
fn every_bad_value_is_an_error_naming_file_line_and_key() {
    let counting = std::env::var_os("KILN_STRICT_COUNT").is_some();
    let out = temp("table");
    let (mut fed, mut accepted, mut good) = (0, Vec::new(), 0);
    let mut failures = Vec::new();
    for (slot, template, key, expect, builds) in loss_cases().into_iter().chain(other_cases()) {
        for (value, allowed) in expect.candidates() {
            let text = run_text(slot, &template.replace("{v}", &value));
            if allowed {
                good += 1;
                // Good values of [fit] would train; layers needing other shapes cannot build.
                if builds && slot != Slot::Fit {
                    if let Err(e) = outcome(slot, &text, &out) {
                        failures.push(format!("{template} with {value}: good value refused: {e}"));
                    }
                }
                continue;
            }
            let result = outcome(slot, &text, &out.join(format!("{key}-{fed}")));
            fed += 1;
            match result {
                Ok(()) => accepted.push(format!("{template} with {value}")),
                Err(e) => {
                    let place = format!("strict.toml line {}", slot.line());
                    if !(e.contains(&format!("`{key}`")) && e.contains(&place)) {
                        failures.push(format!(
                            "{template} with {value}: error lacks `{key}` or `{place}`: {e}"
                        ));
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    eprintln!(
        "strict_config: fed {fed} bad values ({} accepted), {good} good ones",
        accepted.len()
    );
    if counting {
        eprintln!("accepted:\n{}", accepted.join("\n"));
        return;
    }
    assert!(fed > 500, "only {fed} bad values");
    assert!(accepted.is_empty(), "accepted:\n{}", accepted.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A model whose one layer passes its input through, so `evaluate` computes the loss of
/// `y_pred = x` exactly.
fn loss_of(loss: &str, x: f32, y: f32) -> f64 {
    let text = format!(
        "[model]\ninputs = [{{ name = \"x\", shape = [1] }}]\nlayers = [{{ type = \"activation\", activation = \"linear\" }}]\n[compile]\noptimizer = \"sgd\"\nloss = {loss}\n"
    );
    let run = RunFile::from_text("good.toml", &text, PathBuf::new()).unwrap();
    let prepared = run.prepare(None, &Device::Cpu).unwrap();
    let x = Tensor::new(&[[x]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[y]], &Device::Cpu).unwrap();
    let data = kiln::Dataset::new(x, y).unwrap();
    prepared
        .model
        .evaluate(&data, 1)
        .unwrap()
        .get("loss")
        .unwrap()
}

#[test]
fn good_values_build_the_loss_they_say() {
    // Huber, |error| = 2 beyond delta: delta · (|e| - delta / 2).
    let huber = |d: f64| d * (2.0 - d / 2.0);
    assert!((loss_of(r#"{ type = "huber", delta = 0.5 }"#, 2.0, 0.0) - huber(0.5)).abs() < 1e-6);
    assert!((loss_of(r#"{ type = "huber", delta = 2 }"#, 2.0, 0.0) - 2.0).abs() < 1e-6);
    assert!((loss_of(r#"{ type = "huber" }"#, 2.0, 0.0) - huber(1.0)).abs() < 1e-6);
    // Binary crossentropy from logits (0 → p = 0.5): ln 2 with the flag, and with
    // label_smoothing 0.2 on y = 1 the target is 0.9.
    let ln2 = std::f64::consts::LN_2;
    let bce = loss_of(r#"{ type = "bce", from_logits = true }"#, 0.0, 1.0);
    assert!((bce - ln2).abs() < 1e-6, "{bce}");
    // Without from_logits, 0.0 is a probability (clipped to 1e-7): a huge loss, not ln 2.
    assert!(loss_of(r#"{ type = "bce", from_logits = false }"#, 0.0, 1.0) > 10.0);
    // Focal with gamma 0 and no balancing is plain crossentropy.
    let focal = loss_of(
        r#"{ type = "binary_focal_crossentropy", gamma = 0, from_logits = true }"#,
        0.0,
        1.0,
    );
    assert!((focal - ln2).abs() < 1e-6, "{focal}");
}

#[test]
fn a_saved_model_json_with_a_bad_value_names_the_file_and_key() {
    let dir = temp("json");
    let path = dir.join("model.json");
    let json = serde_json::json!({
        "format": "kiln-model", "version": 1, "seed": 0,
        "model": { "inputs": [{ "name": "x", "shape": [3] }], "layers": [{ "type": "dense", "units": 1 }] },
        "compile": { "optimizer": "sgd", "loss": { "type": "huber", "delta": "0.5" } }
    });
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let err = RunFile::from_path(&path)
        .unwrap()
        .prepare(None, &Device::Cpu)
        .err()
        .expect("a string delta is refused")
        .to_string();
    assert!(
        err.contains("model.json") && err.contains("`loss` `delta`"),
        "{err}"
    );
    assert!(err.contains("\"0.5\""), "{err}");
    // The line of the value in the (pretty-printed) file itself.
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().position(|l| l.contains("\"delta\"")).unwrap() + 1;
    assert!(err.contains(&format!("model.json line {line}:")), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn conformance_configs_are_as_strict() {
    use kiln::reduction::Reduction;
    for (config, key) in [
        (serde_json::json!({ "delta": "0.5" }), "delta"),
        (serde_json::json!({ "delta": -1.0 }), "delta"),
        (serde_json::json!({ "deltaa": 1.0 }), "deltaa"),
    ] {
        let err = kiln::conformance::loss_from_keras("Huber", &config, Reduction::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(&format!("Huber config.{key}")), "{err}");
    }
    let err = kiln::conformance::regularizer_from_keras("L2", &serde_json::json!({ "l2": "x" }))
        .expect_err("refused")
        .to_string();
    assert!(err.contains("L2 config.l2"), "{err}");
}

#[test]
fn models_too_large_for_the_machine_are_refused_before_allocating() {
    let model_of = |shape: &str, layers: &str| {
        format!(
            "[model]\ninputs = [{{ name = \"x\", shape = {shape} }}]\nlayers = [{layers}]\n[compile]\noptimizer = \"sgd\"\nloss = \"mse\"\n"
        )
    };
    let model = |layers: &str| model_of("[3]", layers);
    let mut cases = vec![
        (
            model(r#"{ type = "dense", name = "huge", units = 9223372036854775807 }"#),
            "huge",
        ),
        (
            model(r#"{ type = "dense", name = "big", units = 68719476736 }"#),
            "big",
        ),
        (
            model_of(
                "[2, 3]",
                r#"{ type = "lstm", name = "rnn", units = 4611686018427387904 }"#,
            ),
            "rnn",
        ),
    ];
    // Two 100,000-unit Dense layers: the second kernel is 10^10 f32 (4·10^10 bytes, 1.2·10^11
    // at peak while drawn). A machine with that much memory could build it: skip it there.
    if (kiln::initializers::memory_limit() as f64) < 1.2e11 {
        cases.push((
            model(
                r#"{ type = "dense", name = "wide", units = 100000 }, { type = "dense", name = "wider", units = 100000 }"#,
            ),
            "wider",
        ));
    }
    for (text, layer) in cases {
        let err = RunFile::from_text("big.toml", &text, PathBuf::new())
            .unwrap()
            .prepare(None, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{text} was built"))
            .to_string();
        assert!(
            err.contains(&format!("layer `{layer}`")) && err.contains("bytes"),
            "{err}"
        );
    }
}

/// A TOML value from proptest's pieces, with what it is.
#[derive(Debug, Clone)]
enum Generated {
    Float(f64),
    Int(i64),
    Bool(bool),
    Str(String),
}

impl Generated {
    fn toml(&self) -> String {
        match self {
            Generated::Float(x) if x.is_nan() => "nan".into(),
            Generated::Float(x) if x.is_infinite() => {
                if *x > 0.0 {
                    "inf".into()
                } else {
                    "-inf".into()
                }
            }
            Generated::Float(x) => format!("{x:?}"),
            Generated::Int(i) => i.to_string(),
            Generated::Bool(b) => b.to_string(),
            Generated::Str(s) => format!("{s:?}"),
        }
    }
    fn allowed_by(&self, expect: Expect) -> bool {
        match (self, expect) {
            (Generated::Bool(_), Expect::Bool) => true,
            (Generated::Float(x), e) => e.allows_number(*x),
            (Generated::Int(i), e) => e.allows_integer(*i),
            _ => false,
        }
    }
}

fn generated() -> impl Strategy<Value = Generated> {
    prop_oneof![
        any::<f64>().prop_map(Generated::Float),
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(0.0),
            Just(1.0),
            Just(-0.0)
        ]
        .prop_map(Generated::Float),
        (-3.0f64..3.0).prop_map(Generated::Float),
        any::<i64>().prop_map(Generated::Int),
        (-3i64..4).prop_map(Generated::Int),
        any::<bool>().prop_map(Generated::Bool),
        "[a-z0-9.]{0,5}".prop_map(Generated::Str),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any value for any loss parameter: an error naming the key, or a loss built from a value
    /// that was allowed (finite and in range); never a panic.
    #[test]
    fn random_loss_parameters_are_ok_only_when_allowed(
        case in any::<proptest::sample::Index>(),
        value in generated(),
    ) {
        let cases = loss_cases();
        let (slot, template, key, expect, _) = cases[case.index(cases.len())];
        let text = run_text(slot, &template.replace("{v}", &value.toml()));
        let result = RunFile::from_text("prop.toml", &text, PathBuf::new())
            .and_then(|run| run.prepare(None, &Device::Cpu).map(|_| ()));
        match result {
            Ok(()) => prop_assert!(value.allowed_by(expect), "{template} accepted {}", value.toml()),
            Err(e) => {
                let e = e.to_string();
                prop_assert!(!value.allowed_by(expect), "{template} refused {}: {e}", value.toml());
                prop_assert!(e.contains(&format!("`{key}`")) && e.contains("prop.toml line 14"), "{e}");
            }
        }
    }
}

/// A run file whose layer under test (line 8) sees a `[batch, 1, 2]` input: one step of two
/// channels, so that normalization axes, convolution groups and recurrent dropout all build.
const LAYER_OPTIONS: &str = r#"seed = 0
[data]
source = "blobs"
samples = 20
[model]
layers = [
  { type = "reshape", target_shape = [1, 2] },
  {LAYER},
  { type = "flatten" },
  { type = "dense", name = "out", units = 1 },
]
[compile]
optimizer = "sgd"
loss = "mse"
"#;

/// (the layer with `{v}` for the value, key, what it allows on a `[batch, 1, 2]` input).
const LAYER_OPTION_CASES: [(&str, &str, Expect); 10] = [
    (
        r#"{ type = "batch_normalization", axis = {v} }"#,
        "axis",
        Expect::OneOf(&[1, 2, -1, -2]),
    ),
    (
        r#"{ type = "layer_normalization", axes = {v} }"#,
        "axes",
        Expect::OneOf(&[1, 2, -1, -2]),
    ),
    (
        r#"{ type = "layer_normalization", axes = [2, {v}] }"#,
        "axes",
        Expect::OneOf(&[1, -2]),
    ),
    (
        r#"{ type = "conv1d", filters = 2, kernel_size = 1, groups = {v} }"#,
        "groups",
        Expect::OneOf(&[1, 2]),
    ),
    (
        r#"{ type = "conv1d", filters = 4, kernel_size = 1, groups = {v} }"#,
        "groups",
        Expect::OneOf(&[1, 2]),
    ),
    (
        r#"{ type = "lstm", units = 2, return_sequences = true, dropout = {v} }"#,
        "dropout",
        UNIT_OPEN,
    ),
    (
        r#"{ type = "gru", units = 2, return_sequences = true, dropout = {v} }"#,
        "dropout",
        UNIT_OPEN,
    ),
    (
        r#"{ type = "lstm", units = 2, return_sequences = true, recurrent_dropout = {v} }"#,
        "recurrent_dropout",
        UNIT_OPEN,
    ),
    (
        r#"{ type = "gru", units = 2, return_sequences = true, recurrent_dropout = {v} }"#,
        "recurrent_dropout",
        UNIT_OPEN,
    ),
    (
        r#"{ type = "lstm", units = 2, return_sequences = true, dropuot = {v} }"#,
        "dropuot",
        Expect::OneOf(&[]),
    ),
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any value for the normalization axes, convolution groups and recurrent dropout (and a
    /// misspelt key): an error naming the file, the line and the key, or a model built from a
    /// value that was allowed; never a panic.
    #[test]
    fn random_layer_options_are_ok_only_when_allowed(
        case in any::<proptest::sample::Index>(),
        value in generated(),
    ) {
        let (template, key, expect) = LAYER_OPTION_CASES[case.index(LAYER_OPTION_CASES.len())];
        let text = LAYER_OPTIONS.replace("{LAYER}", &template.replace("{v}", &value.toml()));
        let result = RunFile::from_text("layer.toml", &text, PathBuf::new())
            .and_then(|run| run.prepare(None, &Device::Cpu).map(|_| ()));
        match result {
            Ok(()) => prop_assert!(value.allowed_by(expect), "{template} accepted {}", value.toml()),
            Err(e) => {
                let e = e.to_string();
                prop_assert!(!value.allowed_by(expect), "{template} refused {}: {e}", value.toml());
                prop_assert!(e.contains(&format!("`{key}`")) && e.contains("layer.toml line 8"), "{e}");
            }
        }
    }
}

/// Every allowed value of the layer options builds, over the values the table feeds too.
#[test]
fn layer_options_build_what_they_say() {
    for (template, key, expect) in LAYER_OPTION_CASES {
        for (value, allowed) in expect.candidates() {
            let text = LAYER_OPTIONS.replace("{LAYER}", &template.replace("{v}", &value));
            let result = RunFile::from_text("layer.toml", &text, PathBuf::new())
                .and_then(|run| run.prepare(None, &Device::Cpu).map(|_| ()));
            match result {
                Ok(()) => assert!(allowed, "{template} accepted {value}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(!allowed, "{template} refused {value}: {e}");
                    assert!(
                        e.contains(&format!("`{key}`")) && e.contains("layer.toml line 8"),
                        "{template} with {value}: {e}"
                    );
                }
            }
        }
    }
}

/// The library's own builders, misused: the values are refused where they are used.
#[test]
fn library_builders_refuse_bad_values_where_they_are_used() {
    use kiln::prelude::*;
    let model = || {
        let x = Input::new([2]);
        let y = Dense::new(2).apply(&x).unwrap();
        Model::new(&[x], &[y]).unwrap()
    };
    let data = || {
        let x = Tensor::new(&[[0f32, 1.], [1., 0.], [1., 1.], [0., 0.]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0f32, 1., 1., 0.], &Device::Cpu).unwrap();
        Dataset::new(x, y).unwrap()
    };
    let scce = || SparseCategoricalCrossentropy::new().from_logits(true);
    // Optimizer hyperparameters: refused by compile.
    let bad: Vec<(Box<dyn Optimizer>, &str)> = vec![
        (Box::new(Adam::new(1e-3).beta_1(1.5)), "beta_1"),
        (Box::new(Adam::new(1e-3).beta_2(f64::NAN)), "beta_2"),
        (Box::new(Adam::new(1e-3).epsilon(0.0)), "epsilon"),
        (Box::new(Adam::new(1e-3).weight_decay(-1.0)), "weight_decay"),
        (Box::new(AdamW::new(1e-3).beta_1(-0.1)), "beta_1"),
        (Box::new(RmsProp::new(1e-3).rho(1.0)), "rho"),
        (
            Box::new(RmsProp::new(1e-3).momentum(f64::INFINITY)),
            "momentum",
        ),
        (Box::new(Sgd::new(0.1).momentum(1.5)), "momentum"),
        (Box::new(Adam::new(f64::NAN)), "learning rate"),
    ];
    for (opt, what) in bad {
        let err = model()
            .compile(Compile::from_boxed(opt).loss(scce()))
            .expect_err("refused")
            .to_string();
        assert!(err.contains(what), "{err}");
    }
    // Fit fractions and class weights: refused by fit (they used to be ignored or train to NaN).
    for (fit, what) in [
        (Fit::new().validation_split(-0.5), "validation_split"),
        (Fit::new().validation_split(f64::NAN), "validation_split"),
        (
            Fit::new().class_weight(vec![(0, -1.0), (1, 1.0)]),
            "class_weight",
        ),
        (
            Fit::new().class_weight(vec![(0, f64::NAN), (1, 1.0)]),
            "class_weight",
        ),
    ] {
        let mut m = model();
        m.compile(Compile::new(Sgd::new(0.1)).loss(scce())).unwrap();
        let err = m
            .fit(&data(), fit.quiet())
            .expect_err("refused")
            .to_string();
        assert!(err.contains(what), "{err}");
    }
}

/// The layer options a run file gives reach the layers: the Keras config kiln writes for the
/// model carries each value as written.
#[test]
fn layer_options_reach_the_layers() {
    use std::io::Read;
    let text = r#"seed = 0
[data]
source = "blobs"
samples = 20
[model]
layers = [
  { type = "dense", name = "pre", units = 4 },
  { type = "reshape", target_shape = [2, 2] },
  { type = "batch_normalization", name = "bn", axis = 1 },
  { type = "layer_normalization", name = "ln", axes = [-2, 2] },
  { type = "conv1d", name = "conv", filters = 4, kernel_size = 1, groups = 2 },
  { type = "lstm", name = "lstm", units = 3, return_sequences = true, dropout = 0.25 },
  { type = "gru", name = "gru", units = 2, dropout = 0.5, recurrent_dropout = 0.125 },
  { type = "dense", name = "out", units = 1 },
]
[compile]
optimizer = "sgd"
loss = "mse"
"#;
    let run = RunFile::from_text("options.toml", text, PathBuf::new()).unwrap();
    let model = run.prepare(None, &Device::Cpu).unwrap().model;
    assert_eq!(model.weight("ln/gamma").unwrap().var.dims(), &[2, 2]);
    assert_eq!(model.weight("bn/gamma").unwrap().var.dims(), &[2]);
    assert_eq!(model.weight("conv/kernel").unwrap().var.dims(), &[1, 1, 4]);
    let dir = temp("options");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("options.keras");
    kiln::keras::save(&model, &path, false).unwrap();
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    let mut config = String::new();
    zip.by_name("config.json")
        .unwrap()
        .read_to_string(&mut config)
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let layer = |name: &str| {
        config["config"]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()["config"]
            .clone()
    };
    assert_eq!(layer("bn")["axis"], 1);
    assert_eq!(layer("ln")["axis"], serde_json::json!([-2, 2]));
    assert_eq!(layer("conv")["groups"], 2);
    assert_eq!(layer("lstm")["dropout"], 0.25);
    assert_eq!(layer("gru")["dropout"], 0.5);
    assert_eq!(layer("gru")["recurrent_dropout"], 0.125);
}

/// `data_format` on convolution, pooling and Flatten layers: `"channels_first"` reads the first
/// axis of a sample as its channels (Keras' option), and anything but the two formats is an
/// error naming the file, line and key.
#[test]
fn data_format_is_read_and_checked() {
    let run = |format: &str| {
        format!(
            r#"seed = 0
[data]
source = "blobs"
samples = 40
features = 8
[model]
layers = [
  {{ type = "reshape", target_shape = [2, 4] }},
  {{ type = "conv1d", name = "conv", filters = 3, kernel_size = 2, data_format = {format} }},
  {{ type = "max_pooling1d", pool_size = 1, data_format = {format} }},
  {{ type = "flatten", data_format = {format} }},
  {{ type = "dense", name = "out", units = 1 }},
]
[compile]
optimizer = "sgd"
loss = "mse"
"#
        )
    };
    let kernel = |format: &str| {
        let prepared = RunFile::from_text("formats.toml", &run(format), PathBuf::new())
            .and_then(|r| r.prepare(None, &Device::Cpu))
            .unwrap();
        let dims = prepared
            .model
            .weight("conv/kernel")
            .unwrap()
            .var
            .dims()
            .to_vec();
        dims
    };
    // Channels last: 4 channels over 2 steps; channels first: 2 channels over 4 steps.
    assert_eq!(kernel(r#""channels_last""#), [2, 4, 3]);
    assert_eq!(kernel(r#""channels_first""#), [2, 2, 3]);
    for bad in [r#""channels_middle""#, "1", "true"] {
        let e = RunFile::from_text("formats.toml", &run(bad), PathBuf::new())
            .and_then(|r| r.prepare(None, &Device::Cpu))
            .err()
            .unwrap_or_else(|| panic!("data_format = {bad} was accepted"))
            .to_string();
        assert!(
            e.contains("formats.toml") && e.contains("line 9") && e.contains("data_format"),
            "{bad}: {e}"
        );
    }
}
