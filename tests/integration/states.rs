//! Recurrent layers with several outputs: `return_state` (`[output, h, c]` for LSTM, `[output,
//! h]` for GRU) and initial states (Keras' `initial_state`). What they compute is checked against
//! real Keras in keras_files.rs (the `recurrent_states` fixtures); here, the laws that hold for
//! every input: a sequence read in two parts, the second starting from the first's states, gives
//! the states of the whole; the output is the last h; gradients through the states agree with
//! finite differences; masks, summary, weights files and checkpoints; and the errors.

use candle_core::{DType, Device, Tensor, Var};
use kiln::prelude::*;
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Gives every weight random values (a nonzero bias exercises every gate).
fn randomize(model: &Model, seed: u64) {
    for (i, w) in model.weights().iter().enumerate() {
        let r = (random(w.var.dims(), seed + i as u64, w.var.dtype()) * 0.6).unwrap();
        w.var.set(&r).unwrap();
    }
}

/// An LSTM or GRU of 3 units, named `rnn`, returning its states (and its sequence or not).
fn layer(lstm: bool, sequences: bool, backwards: bool) -> SharedLayer {
    if lstm {
        Lstm::new(3)
            .return_state(true)
            .return_sequences(sequences)
            .go_backwards(backwards)
            .with_name("rnn")
            .shared()
    } else {
        Gru::new(3)
            .return_state(true)
            .return_sequences(sequences)
            .go_backwards(backwards)
            .with_name("rnn")
            .shared()
    }
}

/// For LSTM and GRU, with and without return_sequences, at every split of a sequence: the
/// layer run on the first part, then (the same weights) on the rest from the first part's
/// states, ends in the states of the layer run on the whole sequence, and its output is the
/// whole run's output from the split on. The fused GRU kernel (no initial state) and the plain
/// path (initial states) meet here.
#[test]
fn a_sequence_read_in_two_parts_ends_in_the_states_of_the_whole() {
    let steps = 7;
    for lstm in [true, false] {
        for sequences in [false, true] {
            let n_states = if lstm { 2 } else { 1 };
            let shared = layer(lstm, sequences, false);
            let whole_in = Input::named("whole", [steps, 2]);
            let whole = shared.apply_outputs(&[&whole_in]).unwrap();
            let mut model_outputs = whole.clone();
            let mut inputs = vec![whole_in];
            for split in 1..steps {
                let head_in = Input::named(format!("head{split}"), [split, 2]);
                let tail_in = Input::named(format!("tail{split}"), [steps - split, 2]);
                let head = shared.apply_outputs(&[&head_in]).unwrap();
                let mut tail_args = vec![&tail_in];
                tail_args.extend(head[1..].iter());
                let tail = shared.apply_outputs(&tail_args).unwrap();
                model_outputs.extend(tail);
                inputs.push(head_in);
                inputs.push(tail_in);
            }
            let model = Model::new(&inputs, &model_outputs).unwrap();
            randomize(&model, 3);
            let x = random(&[4, steps, 2], 11, DType::F32);
            let mut feed = vec![x.clone()];
            for split in 1..steps {
                feed.push(x.narrow(1, 0, split).unwrap());
                feed.push(x.narrow(1, split, steps - split).unwrap());
            }
            let ys = model.predict(&feed, 8).unwrap();
            let per = 1 + n_states;
            let (whole_out, whole_states) = (&ys[0], &ys[1..per]);
            for (k, split) in (1..steps).enumerate() {
                let tail = &ys[per * (k + 1)..per * (k + 2)];
                for (s, (a, b)) in whole_states.iter().zip(&tail[1..]).enumerate() {
                    let d = max_diff(a, b);
                    assert!(
                        d < 1e-5,
                        "lstm {lstm} seq {sequences} split {split} state {s}: {d}"
                    );
                }
                let want = match sequences {
                    true => whole_out.narrow(1, split, steps - split).unwrap(),
                    false => whole_out.clone(),
                };
                let d = max_diff(&want, &tail[0]);
                assert!(
                    d < 1e-5,
                    "lstm {lstm} seq {sequences} split {split} output: {d}"
                );
            }
        }
    }
}

/// The output is the last h: the same tensor without return_sequences, the last step with it,
/// under a mask (padding at the end carries the state), read forwards or backwards.
#[test]
fn the_output_ends_in_h_masked_or_not_forwards_or_backwards() {
    for lstm in [true, false] {
        for sequences in [false, true] {
            for backwards in [false, true] {
                let ids = Input::named("ids", [5]);
                let e = Embedding::new(9, 2).mask_zero(true).apply(&ids).unwrap();
                let outs = layer(lstm, sequences, backwards)
                    .apply_outputs(&[&e])
                    .unwrap();
                let model = Model::new(&[&ids], &outs).unwrap();
                randomize(&model, 5);
                let tokens = Tensor::new(
                    &[[3f32, 1., 4., 0., 0.], [2., 7., 1., 8., 2.]],
                    &Device::Cpu,
                )
                .unwrap();
                let ys = model.predict(&[tokens], 2).unwrap();
                let last = match sequences {
                    true => ys[0].narrow(1, 4, 1).unwrap().squeeze(1).unwrap(),
                    false => ys[0].clone(),
                };
                let case = format!("lstm {lstm} seq {sequences} backwards {backwards}");
                assert_eq!(values(&last), values(&ys[1]), "{case}");
                assert_eq!(ys.len(), if lstm { 3 } else { 2 }, "{case}");
                // The cell state is not h (h = o · tanh(c)).
                if lstm {
                    assert!(max_diff(&ys[1], &ys[2]) > 1e-3, "{case}");
                }
            }
        }
    }
}

/// As Keras' `RNN.compute_mask`: the output keeps the sequence's mask with return_sequences,
/// the states carry none.
#[test]
fn the_states_carry_no_mask() {
    let ids = Input::new([5]);
    let e = Embedding::new(9, 2).mask_zero(true).apply(&ids).unwrap();
    let seq = layer(true, true, false).apply_outputs(&[&e]).unwrap();
    assert_eq!(seq[0].mask().map(|m| m.shape().to_vec()), Some(vec![5]));
    assert!(seq[1].mask().is_none() && seq[2].mask().is_none());
    let last = layer(false, false, false).apply_outputs(&[&e]).unwrap();
    assert!(last[0].mask().is_none() && last[1].mask().is_none());
}

/// An encoder–decoder in f64: the loss reads the decoder's output alone, so the encoder's
/// weights get their gradient through the states (h and c) only; it agrees with central finite
/// differences for every entry of the encoder's kernel and recurrent kernel, for LSTM and GRU.
#[test]
fn gradients_flow_through_the_states_as_finite_differences_say() {
    for lstm in [true, false] {
        let x = Input::named("x", [4, 2]);
        let y = Input::named("y", [3, 2]);
        let (enc, dec): (SharedLayer, SharedLayer) = if lstm {
            (
                Lstm::new(3).return_state(true).with_name("enc").shared(),
                Lstm::new(3)
                    .return_sequences(true)
                    .with_name("dec")
                    .shared(),
            )
        } else {
            (
                Gru::new(3).return_state(true).with_name("enc").shared(),
                Gru::new(3).return_sequences(true).with_name("dec").shared(),
            )
        };
        let states = enc.apply_outputs(&[&x]).unwrap();
        let mut args = vec![&y];
        args.extend(states[1..].iter());
        let out = dec.apply_outputs(&args).unwrap();
        let model = Model::builder(&[&x, &y], &out)
            .dtype(DType::F64)
            .build()
            .unwrap();
        randomize(&model, 9);
        let xs = [
            random(&[2, 4, 2], 21, DType::F64),
            random(&[2, 3, 2], 22, DType::F64),
        ];
        let w = random(&[2, 3, 3], 23, DType::F64);
        let loss = || -> Tensor {
            let o = &model.call(&xs, false).unwrap()[0];
            (o * &w).unwrap().sum_all().unwrap()
        };
        let grads = loss().backward().unwrap();
        for name in ["enc/kernel", "enc/recurrent_kernel"] {
            let var: Var = model.weight(name).unwrap().var;
            let analytic = values(grads.get(var.as_tensor()).unwrap());
            let base = values(var.as_tensor());
            assert!(
                analytic.iter().any(|g| g.abs() > 1e-4),
                "{name}: no gradient"
            );
            let h = 1e-6;
            for i in 0..base.len() {
                let at = |d: f64| {
                    let mut v = base.clone();
                    v[i] += d;
                    var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    let l = loss().to_scalar::<f64>().unwrap();
                    var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    l
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (analytic[i] - fd).abs() <= 1e-7 + 1e-5 * fd.abs(),
                    "lstm {lstm} {name}[{i}]: analytic {} vs finite difference {fd}",
                    analytic[i]
                );
            }
        }
    }
}

/// Training a model whose loss is on the states lowers it; its weights file and its
/// checkpoint restore the same predictions in a model built again.
#[test]
fn a_model_with_state_outputs_trains_saves_and_restores() {
    let build = || -> Model {
        let x = Input::named("x", [5, 2]);
        let outs = Lstm::new(4)
            .return_state(true)
            .with_name("lstm")
            .apply_outputs(&[&x])
            .unwrap();
        let score = Dense::new(1).with_name("score").apply(&outs[2]).unwrap();
        let mut m = Model::builder(&[&x], &[&score, &outs[1]])
            .seed(4)
            .build()
            .unwrap();
        m.compile(Compile::new(Adam::new(0.02)).loss("mse"))
            .unwrap();
        m
    };
    let mut model = build();
    assert_eq!(model.output_names(), ["score", "lstm"]);
    let x = random(&[16, 5, 2], 31, DType::F32);
    let data = Dataset::multi(
        vec![x.clone()],
        vec![
            random(&[16, 1], 32, DType::F32),
            (random(&[16, 4], 33, DType::F32) * 0.5).unwrap(),
        ],
    )
    .unwrap();
    let history = model
        .fit(&data, Fit::new().epochs(30).batch_size(8).quiet())
        .unwrap();
    let (first, last) = (
        history.epochs[0].get("loss").unwrap(),
        history.last().unwrap().get("loss").unwrap(),
    );
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    assert!(history.last().unwrap().get("lstm_loss").is_some());
    let want = model.predict(std::slice::from_ref(&x), 8).unwrap();

    let dir = std::env::temp_dir().join(format!("kiln-states-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    model.save_weights(dir.join("w.safetensors")).unwrap();
    model.save_checkpoint(&dir, "ckpt", 30, &history).unwrap();
    let fresh = build();
    fresh.load_weights(dir.join("w.safetensors")).unwrap();
    let mut resumed = build();
    resumed.load_checkpoint(&dir, "ckpt").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    for m in [&fresh, &resumed] {
        let got = m.predict(std::slice::from_ref(&x), 8).unwrap();
        for (a, b) in want.iter().zip(&got) {
            assert_eq!(values(a), values(b));
        }
    }
}

/// The summary lists every output of a layer, and what reads a state names its index.
#[test]
fn the_summary_shows_every_output_and_state_indices() {
    let x = Input::named("x", [5, 3]);
    let y = Input::named("y", [4, 2]);
    let enc = Lstm::new(6)
        .return_state(true)
        .with_name("enc")
        .apply_outputs(&[&x])
        .unwrap();
    let dec = Lstm::new(6)
        .with_name("dec")
        .apply_outputs(&[&y, &enc[1], &enc[2]])
        .unwrap();
    let model = Model::new(&[&x, &y], &dec).unwrap();
    let table = model.summary();
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{table}"))
            .to_string()
    };
    assert!(
        row("enc (LSTM)").contains("[(None, 6), (None, 6), (None, 6)]"),
        "{table}"
    );
    assert!(
        row("dec (LSTM)").contains("y[0][0], enc[0][1], enc[0][2]"),
        "{table}"
    );
    // Keras' count: 4·6·(3 + 6 + 1) + 4·6·(2 + 6 + 1).
    assert!(table.contains("Total params: 456 "), "{table}");
}

/// Applying a layer of several outputs with `apply` is refused, naming `apply_outputs`; initial
/// states of the wrong count or shape are refused naming the layer and the shapes.
#[test]
fn wrong_uses_are_errors_that_say_what_to_do() {
    let x = Input::new([5, 3]);
    let err = Lstm::new(4)
        .return_state(true)
        .with_name("enc")
        .apply(&x)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`enc` returns 3 tensors") && err.contains("apply_outputs"),
        "{err}"
    );
    let h = Input::new([4]);
    let err = Lstm::new(4)
        .apply_outputs(&[&x, &h])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 tensor(s) [h, c]") && err.contains("got 1"),
        "{err}"
    );
    let wide = Input::new([5]);
    let err = Gru::new(4)
        .apply_outputs(&[&x, &wide])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("initial state `h` has samples of shape [5]") && err.contains("[4]"),
        "{err}"
    );
    // A layer of one output returns one from apply_outputs.
    assert_eq!(Dense::new(2).apply_outputs(&[&h]).unwrap().len(), 1);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// For any sizes, options and tensors after the sequence, `apply_outputs` either gives the
    /// outputs Keras gives (`[steps, units]` or `[units]`, then one `[units]` per state with
    /// `return_state`), and the built model predicts tensors of those shapes, or, exactly when
    /// the tensors after the sequence are not the layer's states (a count other than 0 or the
    /// states', or a shape other than `[units]`), an error naming the layer.
    #[test]
    fn outputs_have_keras_shapes_or_the_states_given_are_refused(
        lstm in proptest::bool::ANY,
        units in 1usize..6,
        steps in 1usize..5,
        features in 1usize..4,
        sequences in proptest::bool::ANY,
        state in proptest::bool::ANY,
        given in proptest::collection::vec(1usize..7, 0..4),
    ) {
        let x = Input::named("x", [steps, features]);
        let extra: Vec<SymbolicTensor> =
            given.iter().enumerate().map(|(i, &k)| Input::named(format!("s{i}"), [k])).collect();
        let mut args = vec![&x];
        args.extend(extra.iter());
        let result = if lstm {
            Lstm::new(units).return_sequences(sequences).return_state(state).apply_outputs(&args)
        } else {
            Gru::new(units).return_sequences(sequences).return_state(state).apply_outputs(&args)
        };
        let n_states = if lstm { 2 } else { 1 };
        let fits = (given.is_empty() || given.len() == n_states) && given.iter().all(|&k| k == units);
        match result {
            Ok(outs) => {
                proptest::prop_assert!(fits, "{given:?} accepted for {units} units");
                let mut want = vec![if sequences { vec![steps, units] } else { vec![units] }];
                if state {
                    want.extend(std::iter::repeat_n(vec![units], n_states));
                }
                let got: Vec<Vec<usize>> = outs.iter().map(|t| t.shape().to_vec()).collect();
                proptest::prop_assert_eq!(&got, &want);
                let mut inputs = vec![x.clone()];
                inputs.extend(extra.iter().cloned());
                let model = Model::new(&inputs, &outs).unwrap();
                let feed: Vec<Tensor> = inputs
                    .iter()
                    .enumerate()
                    .map(|(i, t)| random(&[&[2][..], t.shape()].concat(), i as u64, DType::F32))
                    .collect();
                let ys = model.predict(&feed, 2).unwrap();
                for (y, w) in ys.iter().zip(&want) {
                    proptest::prop_assert_eq!(&y.dims()[1..], w.as_slice());
                }
            }
            Err(e) => {
                proptest::prop_assert!(!fits, "{given:?} refused: {e}");
                let msg = e.to_string();
                proptest::prop_assert!(msg.contains(if lstm { "LSTM" } else { "GRU" }), "{}", msg);
            }
        }
    }
}
