//! The loss weighting strategies against reference runs written from their papers in PyTorch
//! (tests/fixtures/weighting/reference.json, made by make_weighting_reference.py beside it):
//! the same two-head network from the same weights, SGD on the whole batch, one step per epoch;
//! every step's term weights and every parameter after it must agree to rtol 1e-5.

use kiln::loss_weighting::{DynamicWeightAverage, Famo, GradNorm, PCGrad, Strategy, Uncertainty};
use kiln::prelude::*;
use serde_json::Value;
use std::path::Path;

fn reference() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weighting/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON")
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn tensor(rows: Vec<Vec<f64>>) -> Tensor {
    let (r, c) = (rows.len(), rows[0].len());
    Tensor::from_vec(
        rows.into_iter().flatten().collect::<Vec<_>>(),
        (r, c),
        &Device::Cpu,
    )
    .unwrap()
}

/// The reference problem's model in f64, from the reference's initial weights: heads `a` and
/// `b` on a shared tanh layer.
pub(crate) fn reference_model(reference: &Value) -> Model {
    reference_net(reference, 2)
}

/// The three-head problem of the reference (`*3` runs): a third head `c` and an L2 penalty on
/// the shared kernel, in f64, from the reference's `initial3` weights.
fn reference_model3(reference: &Value) -> Model {
    reference_net(reference, 3)
}

/// The reference's network with `heads` heads (2: `initial`; 3: `c` and the L2 penalty,
/// `initial3`), its weights set from the reference.
fn reference_net(reference: &Value, heads: usize) -> Model {
    let x = Input::new([3]);
    let mut shared = Dense::new(4)
        .activation(Activation::Tanh)
        .with_name("shared");
    if heads == 3 {
        shared = shared.kernel_regularizer(L2::new(reference["l2"].as_f64().unwrap()));
    }
    let h = shared.apply(&x).unwrap();
    let outputs: Vec<_> = ["a", "b", "c"][..heads]
        .iter()
        .map(|name| Dense::new(1).with_name(*name).apply(&h).unwrap())
        .collect();
    let model = Model::builder(&[x], &outputs)
        .dtype(DType::F64)
        .build()
        .unwrap();
    let initial = if heads == 3 { "initial3" } else { "initial" };
    for (name, value) in reference[initial].as_object().unwrap() {
        let w = model.weight(name).unwrap();
        let flat: Vec<f64> = match value.as_array().unwrap()[0].as_array() {
            Some(_) => matrix(value).into_iter().flatten().collect(),
            None => floats(value),
        };
        let t = Tensor::from_vec(flat, w.var.dims(), &Device::Cpu).unwrap();
        w.var.set(&t).unwrap();
    }
    model
}

/// The reference model's compile configuration: `a` by mean squared error, `b` by `b_loss`,
/// and `strategy` over them when given.
fn two_heads(
    optimizer: impl kiln::optimizers::Optimizer + 'static,
    b_loss: impl Into<kiln::losses::LossSpec>,
    strategy: Option<Box<dyn Strategy>>,
) -> Compile {
    let compile = Compile::new(optimizer)
        .loss_for("a", "mse")
        .loss_for("b", b_loss);
    match strategy {
        Some(s) => compile.loss_weighting_boxed(s),
        None => compile,
    }
}

/// The binary crossentropy from logits of the reference's head `b`.
fn logits_bce() -> BinaryCrossentropy {
    BinaryCrossentropy::new().from_logits(true)
}

fn reference_data3(reference: &Value) -> Dataset {
    let x = tensor(matrix(&reference["x"]));
    let y_a = tensor(matrix(&reference["y_a"]));
    let y_b = tensor(matrix(&reference["y_b"]));
    let y_c = tensor(matrix(&reference["y_c"]));
    Dataset::multi(vec![x], vec![y_a, y_b, y_c]).unwrap()
}

pub(crate) fn reference_data(reference: &Value) -> Dataset {
    let x = tensor(matrix(&reference["x"]));
    let y_a = tensor(matrix(&reference["y_a"]));
    let y_b = tensor(matrix(&reference["y_b"]));
    Dataset::multi(vec![x], vec![y_a, y_b]).unwrap()
}

fn close(what: &str, got: f64, want: f64) {
    let tol = 1e-5 * want.abs().max(1e-6);
    assert!(
        (got - want).abs() <= tol,
        "{what}: kiln {got}, reference {want} (rtol 1e-5)"
    );
}

/// Trains kiln one epoch (one step) at a time and compares each step with the reference.
fn check(run: &str, strategy: Option<Box<dyn Strategy>>) {
    check_on(run, strategy, 2)
}

/// [`check`] on the two-head problem or (`heads` 3) the three-head one with its L2 penalty.
fn check_on(run: &str, strategy: Option<Box<dyn Strategy>>, heads: usize) {
    let reference = reference();
    let (mut model, data) = match heads {
        2 => (reference_model(&reference), reference_data(&reference)),
        _ => (reference_model3(&reference), reference_data3(&reference)),
    };
    let lr = reference["learning_rate"].as_f64().unwrap();
    let mut compile = two_heads(Sgd::new(lr), logits_bce(), strategy);
    if heads == 3 {
        compile = compile.loss_for("c", "mse");
    }
    model.compile(compile).unwrap();
    let names = ["a_loss", "b_loss", "c_loss"];
    let names = &names[..heads];
    let steps = reference["runs"][run].as_array().unwrap();
    for (epoch, step) in steps.iter().enumerate() {
        let fit = Fit::new()
            .epochs(epoch + 1)
            .initial_epoch(epoch)
            .batch_size(8)
            .shuffle(false)
            .quiet();
        let history = model.fit(&data, fit).unwrap();
        let logs = history.last().unwrap();
        let terms = floats(&step["terms"]);
        for (i, term) in names.iter().enumerate() {
            close(
                &format!("{run} step {epoch} {term}"),
                logs.get(term).unwrap(),
                terms[i],
            );
        }
        let weights = floats(&step["weights"]);
        if run != "fixed" {
            for (i, term) in names.iter().enumerate() {
                let got = logs.get(&format!("loss_weight/{term}")).unwrap();
                close(
                    &format!("{run} step {epoch} loss_weight/{term}"),
                    got,
                    weights[i],
                );
            }
        }
        // `loss` is Σ weight · term (+ the L2 penalty, which no strategy weighs here).
        let mut shown: f64 = weights.iter().zip(&terms).map(|(w, t)| w * t).sum();
        if heads == 3 {
            shown += logs.get("l2").unwrap();
        }
        close(
            &format!("{run} step {epoch} loss"),
            logs.get("loss").unwrap(),
            shown,
        );
        for (name, want) in step["params"].as_object().unwrap() {
            let got: Vec<f64> = model
                .weight(name)
                .unwrap()
                .var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (k, (g, w)) in got.iter().zip(floats(want)).enumerate() {
                close(&format!("{run} step {epoch} {name}[{k}]"), *g, w);
            }
        }
    }
}

#[test]
fn fixed_weights_match_the_reference() {
    check("fixed", None);
}

#[test]
fn uncertainty_matches_the_reference() {
    check("uncertainty", Some(Box::new(Uncertainty::new())));
}

#[test]
fn dynamic_weight_average_matches_the_reference() {
    check("dwa", Some(Box::new(DynamicWeightAverage::new())));
}

#[test]
fn famo_matches_the_reference() {
    check("famo", Some(Box::new(Famo::new())));
}

/// PCGrad on two heads (the order cannot matter, so kiln draws it as in training) and on three
/// with the L2 penalty added unchanged (the order fixed to term order in both); the reference
/// projects in steps 2 to 4 (and 7 of the three-head run), so the surgery is exercised.
#[test]
fn pcgrad_matches_the_reference() {
    let reference = reference();
    let projected = |run: &str| -> u64 {
        reference["runs"][run]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["projections"].as_u64().unwrap())
            .sum()
    };
    assert!(projected("pcgrad") > 0 && projected("pcgrad3") > 0);
    check("pcgrad", Some(Box::new(PCGrad::new())));
    check_on("pcgrad3", Some(Box::new(PCGrad::new().shuffle(false))), 3);
}

/// GradNorm (α 1.5 at the shared layer, found by default or named), its weights trained by a
/// copy of the model's SGD with their own learning rate, on two heads and on three.
#[test]
fn gradnorm_matches_the_reference() {
    let reference = reference();
    let alpha = reference["alpha"].as_f64().unwrap();
    let lr = reference["weight_learning_rate"].as_f64().unwrap();
    let strategy = || GradNorm::new().alpha(alpha).learning_rate(lr);
    check("gradnorm", Some(Box::new(strategy())));
    check_on("gradnorm3", Some(Box::new(strategy().layer("shared"))), 3);
}

/// A run whose strategy weighs the data term and the L2 penalty (`added_terms`); `{W}` is
/// line 12.
const RUN: &str = r#"seed = 3
[data]
source = "blobs"
samples = 120
[model]
layers = [
  { type = "dense", name = "hidden", units = 8, activation = "relu", kernel_regularizer = { l2 = 1e-2 } },
  { type = "dropout", rate = 0.2 },
  { type = "dense", name = "out", units = 1 },
]
[compile]
{W}
optimizer = { type = "adam", learning_rate = 0.01 }
loss = "mse"
[fit]
epochs = 4
batch_size = 16
validation_split = 0.2
"#;

fn run_text(weighting: &str) -> String {
    RUN.replace("{W}", weighting)
}

fn temp(name: &str) -> std::path::PathBuf {
    crate::support::temp("weighting", name)
}

#[test]
fn run_file_keys_build_the_strategy_they_name() {
    let dir = temp("keys");
    let text =
        run_text(r#"loss_weighting = { type = "dwa", temperature = 3.0, added_terms = true }"#);
    std::fs::write(dir.join("run.toml"), text).unwrap();
    let (ok, _, err) =
        crate::support::kiln_in(&["train", "run.toml", "--quiet", "--out", "r"], &dir);
    assert!(ok, "{err}");
    let history: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("r/history.json")).unwrap())
            .unwrap();
    // DWA: weight 1 for two epochs, then K·softmax(r / 3) from the logged epoch means.
    let series = |k: &str| floats(&history[k]);
    let (out, l2) = (series("out_loss"), series("l2"));
    assert_eq!(series("loss_weight/out_loss")[..2], [1.0, 1.0]);
    for epoch in 2..4 {
        let r = [
            out[epoch - 1] / out[epoch - 2],
            l2[epoch - 1] / l2[epoch - 2],
        ];
        let e = [(r[0] / 3.0).exp(), (r[1] / 3.0).exp()];
        let want = [2.0 * e[0] / (e[0] + e[1]), 2.0 * e[1] / (e[0] + e[1])];
        close(
            "loss_weight/out_loss",
            series("loss_weight/out_loss")[epoch],
            want[0],
        );
        close("loss_weight/l2", series("loss_weight/l2")[epoch], want[1]);
    }
    // GradNorm and PCGrad over the data term and the penalty: GradNorm's weights move and
    // sum to 2 in every epoch; PCGrad's are 1.
    for (line, moves) in [
        (
            r#"loss_weighting = { type = "gradnorm", alpha = 0.5, learning_rate = 0.01, layer = "hidden", added_terms = true }"#,
            true,
        ),
        (
            r#"loss_weighting = { type = "pcgrad", shuffle = false, added_terms = true }"#,
            false,
        ),
    ] {
        std::fs::write(dir.join("g.toml"), run_text(line)).unwrap();
        let (ok, _, err) =
            crate::support::kiln_in(&["train", "g.toml", "--quiet", "--out", "g"], &dir);
        assert!(ok, "{line}: {err}");
        let history: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("g/history.json")).unwrap())
                .unwrap();
        let (w_out, w_l2) = (
            floats(&history["loss_weight/out_loss"]),
            floats(&history["loss_weight/l2"]),
        );
        assert_eq!(w_out.len(), 4);
        for (a, b) in w_out.iter().zip(&w_l2) {
            close("weights sum", a + b, 2.0);
        }
        assert_eq!(w_out.iter().any(|w| *w != 1.0), moves, "{line}: {w_out:?}");
        std::fs::remove_dir_all(dir.join("g")).ok();
    }
    // The string form takes the defaults.
    std::fs::write(
        dir.join("famo.toml"),
        run_text(r#"loss_weighting = "famo""#),
    )
    .unwrap();
    let (ok, _, err) =
        crate::support::kiln_in(&["train", "famo.toml", "--quiet", "--out", "f"], &dir);
    // One term (no added_terms) is refused, naming the terms.
    assert!(
        !ok && err.contains("at least two terms") && err.contains("out_loss"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_run_file_values_name_the_file_line_and_key() {
    let dir = temp("bad");
    let cases = [
        (
            r#"loss_weighting = { type = "dwa", temperature = 0 }"#,
            "temperature",
        ),
        (
            r#"loss_weighting = { type = "dwa", temperature = -1.5 }"#,
            "temperature",
        ),
        (
            r#"loss_weighting = { type = "dwa", temperature = nan }"#,
            "temperature",
        ),
        (
            r#"loss_weighting = { type = "dwa", temperature = "2" }"#,
            "temperature",
        ),
        (
            r#"loss_weighting = { type = "famo", learning_rate = inf }"#,
            "learning_rate",
        ),
        (
            r#"loss_weighting = { type = "famo", gamma = -1e-5 }"#,
            "gamma",
        ),
        (
            r#"loss_weighting = { type = "uncertainty", initial_log_var = true }"#,
            "initial_log_var",
        ),
        (
            r#"loss_weighting = { type = "uncertainty", added_terms = 1 }"#,
            "added_terms",
        ),
        (
            r#"loss_weighting = { type = "uncertainty", temprature = 2 }"#,
            "temprature",
        ),
        (r#"loss_weighting = { type = "gradnorn" }"#, "gradnorn"),
        (
            r#"loss_weighting = { type = "gradnorm", alpha = -0.5 }"#,
            "alpha",
        ),
        (
            r#"loss_weighting = { type = "gradnorm", learning_rate = 0 }"#,
            "learning_rate",
        ),
        (
            r#"loss_weighting = { type = "gradnorm", layer = 3 }"#,
            "layer",
        ),
        (
            r#"loss_weighting = { type = "gradnorm", layers = "hidden" }"#,
            "layers",
        ),
        (
            r#"loss_weighting = { type = "pcgrad", shuffle = "no" }"#,
            "shuffle",
        ),
        (r#"loss_weighting = { type = "pcgrad", seed = 3 }"#, "seed"),
        (r#"loss_weighting = 3"#, "loss_weighting"),
    ];
    for (line, key) in cases {
        let text = run_text(line);
        let err = match kiln::run::RunFile::from_text("w.toml", &text, dir.clone())
            .and_then(|run| run.prepare(None, &Device::Cpu).map(|_| ()))
        {
            Ok(()) => panic!("{line}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("w.toml line 12") && err.contains(key),
            "{line}: the error lacks `w.toml line 12` or `{key}`: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Train 4 epochs at once, or 2, a checkpoint, a fresh model restored from it and 2 more: the
/// weights, the strategy's variables and the history agree bit for bit.
fn resume_is_bit_identical(strategy: impl Fn() -> Box<dyn Strategy>) {
    let reference = reference();
    let data = reference_data(&reference);
    let compiled = || {
        let mut m = reference_model(&reference);
        m.compile(two_heads(Adam::new(0.05), logits_bce(), Some(strategy())))
            .unwrap();
        m
    };
    let fit = |from: usize, to: usize| {
        Fit::new()
            .epochs(to)
            .initial_epoch(from)
            .batch_size(3)
            .seed(4)
            .quiet()
    };
    let mut whole = compiled();
    let full = whole.fit(&data, fit(0, 4)).unwrap();
    let dir = temp(&format!("resume-{}", strategy().name()));
    let mut first = compiled();
    let part = first.fit(&data, fit(0, 2)).unwrap();
    first.save_checkpoint(&dir, "last", 2, &part).unwrap();
    let mut resumed = compiled();
    let checkpoint = resumed.load_checkpoint(&dir, "last").unwrap();
    let rest = resumed.fit(&data, fit(2, 4)).unwrap();
    let mut history = checkpoint.history();
    history.epochs.extend(rest.epochs);
    let bits = |m: &Model| -> Vec<u64> {
        m.weights()
            .iter()
            .flat_map(|w| {
                w.var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .map(f64::to_bits)
            .collect()
    };
    assert_eq!(
        bits(&whole),
        bits(&resumed),
        "{}: weights differ",
        strategy().name()
    );
    assert_eq!(
        full.without("epoch_time_s"),
        history.without("epoch_time_s"),
        "{}: histories differ",
        strategy().name()
    );
    // PCGrad's weights are 1; every other strategy's move.
    let moved = full
        .get("loss_weight/a_loss")
        .unwrap()
        .iter()
        .any(|w| *w != 1.0);
    assert_eq!(moved, strategy().name() != "pcgrad");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_resumed_run_continues_every_strategy_exactly() {
    resume_is_bit_identical(|| Box::new(Uncertainty::new()));
    resume_is_bit_identical(|| Box::new(DynamicWeightAverage::new()));
    resume_is_bit_identical(|| Box::new(Famo::new()));
    resume_is_bit_identical(|| Box::new(PCGrad::new()));
    // GradNorm's weights train with a copy of the model's Adam: its moments are resumed too.
    resume_is_bit_identical(|| Box::new(GradNorm::new().learning_rate(0.01)));
}

/// GradNorm names a layer that does not exist, or that a term does not reach, in its error;
/// PCGrad and GradNorm refuse gradient accumulation.
#[test]
fn gradient_strategies_refuse_what_they_cannot_do() {
    let reference = reference();
    let data = reference_data(&reference);
    let fit_with = |s: Box<dyn Strategy>, fit: Fit| {
        let mut m = reference_model(&reference);
        m.compile(two_heads(Sgd::new(0.1), "mse", Some(s))).unwrap();
        m.fit(&data, fit).map(|_| ()).unwrap_err().to_string()
    };
    let err = fit_with(Box::new(GradNorm::new().layer("trunk")), Fit::new().quiet());
    assert!(
        err.contains("`trunk`") && err.contains("\"shared\"") && err.contains("\"a\""),
        "{err}"
    );
    let err = fit_with(Box::new(GradNorm::new().layer("a")), Fit::new().quiet());
    assert!(
        err.contains("`b_loss`") && err.contains("layer `a`") && err.contains("\"shared\""),
        "{err}"
    );
    for s in [
        Box::new(PCGrad::new()) as Box<dyn Strategy>,
        Box::new(GradNorm::new()),
    ] {
        let name = s.name().to_string();
        let err = fit_with(s, Fit::new().gradient_accumulation_steps(2).quiet());
        assert!(
            err.contains(&format!("`{name}`")) && err.contains("gradient_accumulation_steps"),
            "{err}"
        );
    }
}

#[test]
fn a_checkpoint_of_another_strategy_is_refused() {
    let reference = reference();
    let data = reference_data(&reference);
    let mut m = reference_model(&reference);
    let compile = |s: Box<dyn Strategy>| two_heads(Sgd::new(0.1), "mse", Some(s));
    m.compile(compile(Box::new(Famo::new()))).unwrap();
    let h = m.fit(&data, Fit::new().quiet()).unwrap();
    let dir = temp("other");
    m.save_checkpoint(&dir, "last", 1, &h).unwrap();
    let mut other = reference_model(&reference);
    other
        .compile(compile(Box::new(Uncertainty::new())))
        .unwrap();
    let err = other.load_checkpoint(&dir, "last").unwrap_err().to_string();
    assert!(
        err.contains("`famo`") && err.contains("`uncertainty`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Compiles the reference model with `strategy`: the error's text if refused.
fn compile_with(strategy: Box<dyn Strategy>) -> std::result::Result<(), String> {
    let mut m = reference_model(&reference());
    m.compile(two_heads(Sgd::new(0.1), "mse", Some(strategy)))
        .map_err(|e| e.to_string())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Any hyperparameter value is taken exactly when it is in range, and refused otherwise
    /// with a message naming the strategy and the hyperparameter.
    #[test]
    fn hyperparameters_are_taken_only_in_range(
        v in proptest::prop_oneof![
            proptest::num::f64::ANY,
            proptest::prelude::Just(0.0),
            proptest::prelude::Just(-0.0),
            proptest::prelude::Just(f64::INFINITY),
            -10.0..10.0f64,
        ]
    ) {
        let cases: [(&str, &str, Box<dyn Strategy>, bool); 6] = [
            ("gradnorm", "alpha", Box::new(GradNorm::new().alpha(v)), v.is_finite() && v >= 0.0),
            ("gradnorm", "learning_rate", Box::new(GradNorm::new().learning_rate(v)), v.is_finite() && v > 0.0),
            ("dwa", "temperature", Box::new(DynamicWeightAverage::new().temperature(v)), v.is_finite() && v > 0.0),
            ("famo", "learning_rate", Box::new(Famo::new().learning_rate(v)), v.is_finite() && v > 0.0),
            ("famo", "gamma", Box::new(Famo::new().gamma(v)), v.is_finite() && v >= 0.0),
            ("uncertainty", "initial_log_var", Box::new(Uncertainty::new().initial_log_var(v)), v.is_finite()),
        ];
        for (name, key, strategy, allowed) in cases {
            match compile_with(strategy) {
                Ok(()) => proptest::prop_assert!(allowed, "{name} {key} = {v} accepted"),
                Err(e) => {
                    proptest::prop_assert!(!allowed, "{name} {key} = {v} refused: {e}");
                    proptest::prop_assert!(e.contains(&format!("`{name}`")) && e.contains(key), "{e}");
                }
            }
        }
    }
}

#[test]
fn a_strategy_needs_two_terms_and_weight_added_terms_needs_a_strategy() {
    let x = Input::new([2]);
    let y = Dense::new(1)
        .kernel_regularizer(L2::new(0.1))
        .apply(&x)
        .unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    let err = m
        .compile(
            Compile::new(Sgd::new(0.1))
                .loss("mse")
                .loss_weighting(Uncertainty::new()),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("at least two terms") && err.contains("weight_added_terms"),
        "{err}"
    );
    // With the L2 penalty weighed too, there are two: the data term and `l2`.
    m.compile(
        Compile::new(Sgd::new(0.1))
            .loss("mse")
            .loss_weighting(Uncertainty::new())
            .weight_added_terms(true),
    )
    .unwrap();
    let err = m
        .compile(
            Compile::new(Sgd::new(0.1))
                .loss("mse")
                .weight_added_terms(true),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("no loss weighting strategy"), "{err}");
}

/// FAMO compares a batch before and after its own update, so it refuses gradient accumulation.
#[test]
fn famo_refuses_gradient_accumulation() {
    let reference = reference();
    let mut m = reference_model(&reference);
    m.compile(two_heads(Sgd::new(0.1), "mse", Some(Box::new(Famo::new()))))
        .unwrap();
    let err = m
        .fit(
            &reference_data(&reference),
            Fit::new().gradient_accumulation_steps(2).quiet(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("famo") && err.contains("gradient_accumulation_steps"),
        "{err}"
    );
}

/// Under a strategy, `grad_norm/<term>` is the norm of the term's own gradient, before the
/// strategy's weight: one step on the whole batch gives the same norms as with no strategy
/// and as `term_gradients` on the untrained model, for strategies whose first weights are
/// not 1 (uncertainty with log-variance 1: weight e⁻¹/2; FAMO: z/(c·L)) and for GradNorm and
/// PCGrad.
#[test]
fn diagnostics_under_a_strategy_are_of_the_unweighted_terms() {
    let reference = reference();
    let data = reference_data(&reference);
    let fitted = |strategy: Option<Box<dyn Strategy>>| {
        let mut m = reference_model(&reference);
        m.compile(two_heads(Sgd::new(0.1), logits_bce(), strategy))
            .unwrap();
        let g = m.term_gradients(&data).unwrap();
        let fit = Fit::new().batch_size(8).quiet().gradient_diagnostics(true);
        let h = m.fit(&data, fit).unwrap();
        (h, g)
    };
    let (plain, g) = fitted(None);
    let want = [g.norm("a_loss").unwrap(), g.norm("b_loss").unwrap()];
    let cos = g.cosine("a_loss", "b_loss").unwrap();
    for (i, term) in ["a_loss", "b_loss"].iter().enumerate() {
        close(
            "no strategy",
            plain.get(&format!("grad_norm/{term}")).unwrap()[0],
            want[i],
        );
    }
    let strategies: Vec<Box<dyn Strategy>> = vec![
        Box::new(Uncertainty::new().initial_log_var(1.0)),
        Box::new(Famo::new()),
        Box::new(GradNorm::new()),
        Box::new(PCGrad::new()),
    ];
    for s in strategies {
        let name = s.name().to_string();
        let (h, _) = fitted(Some(s));
        let weights: Vec<f64> = ["a_loss", "b_loss"]
            .iter()
            .map(|t| h.get(&format!("loss_weight/{t}")).unwrap()[0])
            .collect();
        if name == "uncertainty" || name == "famo" {
            assert!(
                weights.iter().all(|w| (w - 1.0).abs() > 0.02),
                "{name}: {weights:?}"
            );
        }
        for (i, term) in ["a_loss", "b_loss"].iter().enumerate() {
            close(
                &format!("{name} grad_norm/{term}"),
                h.get(&format!("grad_norm/{term}")).unwrap()[0],
                want[i],
            );
        }
        close(
            &format!("{name} grad_cos"),
            h.get("grad_cos/a_loss/b_loss").unwrap()[0],
            cos,
        );
    }
}

/// PCGrad beside an FGSM term (and the three-head run with the order drawn, not fixed): the
/// step is the projected sum of the two heads' gradients over the shared layer, each head's
/// own gradient on its weights, plus the adversarial term's gradient unchanged everywhere.
/// From the reference's weights after its step 1, where the heads' gradients conflict.
#[test]
fn pcgrad_adds_the_adversarial_term_unchanged() {
    let reference = reference();
    let data = reference_data(&reference);
    let mut model = reference_model(&reference);
    for (name, value) in reference["runs"]["pcgrad"][1]["params"]
        .as_object()
        .unwrap()
    {
        let w = model.weight(name).unwrap();
        let t = Tensor::from_vec(floats(value), w.var.dims(), &Device::Cpu).unwrap();
        w.var.set(&t).unwrap();
    }
    model
        .add_loss_term("adversarial", Adversarial::fgsm(0.1).multiplier(0.5))
        .unwrap();
    model
        .compile(two_heads(
            Sgd::new(0.1),
            logits_bce(),
            Some(Box::new(PCGrad::new())),
        ))
        .unwrap();
    let g = model.term_gradients(&data).unwrap();
    assert!(g.cosine("a_loss", "b_loss").unwrap() < -1e-3);
    let values = |t: &Option<Tensor>| -> Vec<f64> {
        t.as_ref()
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .unwrap_or_default()
    };
    let shared: Vec<usize> = (0..g.weights.len())
        .filter(|&i| g.weights[i].starts_with("shared/"))
        .collect();
    let flat = |term: &str| -> Vec<f64> {
        let t = g.term(term).unwrap();
        shared
            .iter()
            .flat_map(|&i| values(&t.gradients[i]))
            .collect()
    };
    let (ga, gb) = (flat("a_loss"), flat("b_loss"));
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    let d = dot(&ga, &gb);
    let pc: Vec<f64> = (0..ga.len())
        .map(|k| (ga[k] - d / dot(&gb, &gb) * gb[k]) + (gb[k] - d / dot(&ga, &ga) * ga[k]))
        .collect();
    let before: Vec<Vec<f64>> = model
        .trainable_weights()
        .iter()
        .map(|w| w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    model
        .fit(&data, Fit::new().batch_size(8).shuffle(false).quiet())
        .unwrap();
    let mut at = 0;
    for (i, w) in model.trainable_weights().iter().enumerate() {
        let after: Vec<f64> = w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let adversarial = values(&g.term("adversarial").unwrap().gradients[i]);
        for k in 0..after.len() {
            let combined = match shared.contains(&i) {
                true => pc[at + k],
                false => ["a_loss", "b_loss"]
                    .iter()
                    .map(|t| {
                        values(&g.term(t).unwrap().gradients[i])
                            .get(k)
                            .copied()
                            .unwrap_or(0.0)
                    })
                    .sum(),
            };
            let want = before[i][k] - 0.1 * (combined + adversarial[k]);
            close(&format!("{}[{k}]", g.weights[i]), after[k], want);
        }
        if shared.contains(&i) {
            at += after.len();
        }
    }
    // With only pairwise conflicts in the three-head run, any order gives the reference's.
    check_on("pcgrad3", Some(Box::new(PCGrad::new())), 3);
}
