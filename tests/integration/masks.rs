//! Explicit masks: reading a symbolic tensor's mask, giving a layer a mask (from another input,
//! or a model input), and which layers pass masks on, against real Keras 3.15.1
//! (tests/fixtures/keras/mask_propagation.json, written by make_keras_models.py). The values
//! of a masked LSTM and GRU and of a masked loss are checked against Keras in keras_files.rs
//! (the `explicit_masks` fixture).

use candle_core::{Device, Tensor};
use kiln::prelude::*;
use serde_json::Value;

fn keras_masks() -> serde_json::Map<String, Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras/mask_propagation.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_object().unwrap().clone()
}

#[test]
fn layers_pass_masks_on_as_keras_does() {
    let ids = Input::named("ids", [6]);
    let other = Input::named("other", [6, 4]);
    let masked = Embedding::new(10, 4).mask_zero(true).apply(&ids).unwrap();
    let masked2 = Embedding::new(10, 4).mask_zero(true).apply(&ids).unwrap();
    let one = |l: kiln::Result<SymbolicTensor>| l.unwrap();
    let keep = NotEqual::new(0.0).apply(&ids).unwrap();
    let cases: Vec<(&str, SymbolicTensor)> = vec![
        ("dense", one(Dense::new(3).apply(&masked))),
        (
            "activation",
            one(ActivationLayer::new(Activation::Relu).apply(&masked)),
        ),
        ("dropout", one(Dropout::new(0.2).apply(&masked))),
        ("flatten", one(Flatten::new().apply(&masked))),
        ("max_pooling1d", one(MaxPooling1D::new(2).apply(&masked))),
        (
            "average_pooling1d",
            one(AveragePooling1D::new(2).apply(&masked)),
        ),
        (
            "global_average_pooling1d",
            one(GlobalAveragePooling1D::new().apply(&masked)),
        ),
        (
            "global_max_pooling1d",
            one(GlobalMaxPooling1D::new().apply(&masked)),
        ),
        ("conv1d", one(Conv1D::new(2, 3).apply(&masked))),
        (
            "layer_normalization",
            one(LayerNormalization::new().apply(&masked)),
        ),
        (
            "batch_normalization",
            one(BatchNormalization::new().apply(&masked)),
        ),
        ("reshape", one(Reshape::new([24]).apply(&masked))),
        (
            "lstm_sequences",
            one(Lstm::new(2).return_sequences(true).apply(&masked)),
        ),
        ("lstm_last", one(Lstm::new(2).apply(&masked))),
        (
            "gru_sequences",
            one(Gru::new(2).return_sequences(true).apply(&masked)),
        ),
        (
            "concatenate_one_masked",
            one(Concatenate::new().apply_many(&[&masked, &other])),
        ),
        (
            "concatenate_steps_one_masked",
            one(Concatenate::new().axis(1).apply_many(&[&masked, &other])),
        ),
        (
            "add_one_masked",
            one(Add::new().apply_many(&[&masked, &other])),
        ),
        (
            "add_both_masked",
            one(Add::new().apply_many(&[&masked, &masked2])),
        ),
        (
            "multiply_both_masked",
            one(Multiply::new().apply_many(&[&masked, &masked2])),
        ),
        (
            "lstm_explicit_on_unmasked",
            one(Lstm::new(2)
                .return_sequences(true)
                .apply_with_mask(&other, &keep)),
        ),
    ];
    let keras = keras_masks();
    assert_eq!(keras.len(), cases.len());
    for (name, t) in &cases {
        let want: Option<Vec<usize>> = serde_json::from_value(keras[*name].clone()).unwrap();
        let got = t.mask().map(|m| m.shape().to_vec());
        assert_eq!(got, want, "{name}: the mask kiln's {name} carries");
    }
}

/// A tokens input whose padding (id 0) masks another input's sequence.
fn lstm_masked_by_tokens() -> (Model, SharedLayer) {
    let tokens = Input::named("tokens", [6]);
    let steps = Input::named("steps", [6, 3]);
    let keep = NotEqual::new(0.0).with_name("keep").apply(&tokens).unwrap();
    let lstm = Lstm::new(4).with_name("lstm").shared();
    let h = lstm.apply_with_mask(&steps, &keep).unwrap();
    (Model::new(&[tokens, steps], &[h]).unwrap(), lstm)
}

#[test]
fn an_lstm_given_the_padding_of_another_input_reads_only_the_kept_steps() {
    let (model, lstm) = lstm_masked_by_tokens();
    let dev = Device::Cpu;
    let tokens = Tensor::new(
        &[[3f32, 5., 0., 0., 0., 0.], [1., 2., 3., 4., 5., 6.]],
        &dev,
    )
    .unwrap();
    let steps = Tensor::randn(0f32, 1., (2, 6, 3), &dev).unwrap();
    let masked = model.predict(&[tokens, steps.clone()], 2).unwrap()[0]
        .to_vec2::<f32>()
        .unwrap();
    // The same LSTM (shared weights) on the first two steps alone, and on all six.
    let short = Input::new([2, 3]);
    let full = Input::new([6, 3]);
    let (hs, hf) = (lstm.apply(&short).unwrap(), lstm.apply(&full).unwrap());
    let plain = Model::new(&[short, full], &[hs, hf]).unwrap();
    let outs = plain
        .predict(&[steps.narrow(1, 0, 2).unwrap(), steps], 2)
        .unwrap();
    let (two, six) = (
        outs[0].to_vec2::<f32>().unwrap(),
        outs[1].to_vec2::<f32>().unwrap(),
    );
    for (a, b) in masked[0].iter().zip(&two[0]) {
        assert!(
            (a - b).abs() < 1e-6,
            "padded sequence: {:?} vs {:?}",
            masked[0],
            two[0]
        );
    }
    assert_eq!(masked[1], six[1], "an unpadded sequence is read whole");
    assert_ne!(
        masked[0], six[0],
        "the mask changed the padded sequence's output"
    );
}

#[test]
fn a_mask_can_be_read_as_a_tensor_and_used_in_an_added_loss() {
    let ids = Input::new([4]);
    let e = Embedding::new(5, 2).mask_zero(true).apply(&ids).unwrap();
    let mask = e.mask().expect("mask_zero makes a mask");
    assert_eq!(mask.shape(), &[4]);
    let y = Dense::new(1)
        .apply(&GlobalAveragePooling1D::new().apply(&e).unwrap())
        .unwrap();
    let mut model = Model::new(&[&ids], &[&y, &mask]).unwrap();
    let dev = Device::Cpu;
    let batch = Tensor::new(&[[1f32, 2., 0., 0.], [0., 3., 3., 3.]], &dev).unwrap();
    let out = model.predict(std::slice::from_ref(&batch), 2).unwrap();
    assert_eq!(
        out[1].to_vec2::<u8>().unwrap(),
        vec![vec![1, 1, 0, 0], vec![0, 1, 1, 1]]
    );
    // An added term over the mask: the fraction of padding, 3 of 8 steps.
    let m = mask.clone();
    model
        .add_loss("padding", move |t| {
            Ok((1.0 - t.get(&m)?.to_dtype(DType::F32)?.mean_all()?)?)
        })
        .unwrap();
    model
        .compile(Compile::new(Sgd::new(0.1)).loss_for("dense", "mse"))
        .unwrap();
    let data = Dataset::multi(
        vec![batch],
        vec![Tensor::zeros((2, 1), DType::F32, &dev).unwrap()],
    )
    .unwrap();
    let logs = model.evaluate(&data, 2).unwrap();
    assert!(
        (logs.get("padding").unwrap() - 3.0 / 8.0).abs() < 1e-6,
        "{logs:?}"
    );
}

#[test]
fn a_mask_given_to_a_layer_that_reads_none_or_of_the_wrong_shape_is_an_error() {
    let steps = Input::new([6, 3]);
    let keep = Input::new([6]);
    let err = Dense::new(2)
        .with_name("proj")
        .apply_with_mask(&steps, &keep)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("`proj`") && msg.contains("does not read a mask"),
        "{msg}"
    );
    assert!(msg.contains("LSTM"), "{msg}");
    let wrong = Input::new([5]);
    let msg = Lstm::new(2)
        .with_name("rnn")
        .apply_with_mask(&steps, &wrong)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`rnn`") && msg.contains("[5]") && msg.contains("[6]"),
        "{msg}"
    );
    let msg = Lstm::new(2)
        .apply_many_with_masks(&[&steps], &[Some(&keep), None])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("1 inputs but was given 2 masks"), "{msg}");
    // A mask input that is not one of the model's inputs.
    let h = Lstm::new(2).apply_with_mask(&steps, &keep).unwrap();
    let msg = Model::new(&[&steps], &[&h]).unwrap_err().to_string();
    assert!(msg.contains("not passed to Model::new"), "{msg}");
}

#[test]
fn a_mask_given_as_a_model_input_masks_the_gru() {
    let steps = Input::named("steps", [4, 2]);
    let keep = Input::named("keep", [4]);
    let gru = Gru::new(3).shared();
    let h = gru.apply_with_mask(&steps, &keep).unwrap();
    let short = Input::new([3, 2]);
    let hs = gru.apply(&short).unwrap();
    let model = Model::new(&[&steps, &keep], &[&h]).unwrap();
    let plain = Model::new(&[&short], &[&hs]).unwrap();
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (1, 4, 2), &dev).unwrap();
    let keep_first_three = Tensor::new(&[[1f32, 1., 1., 0.]], &dev).unwrap();
    let masked = model.predict(&[x.clone(), keep_first_three], 1).unwrap()[0]
        .to_vec2::<f32>()
        .unwrap();
    let want = plain.predict(&[x.narrow(1, 0, 3).unwrap()], 1).unwrap()[0]
        .to_vec2::<f32>()
        .unwrap();
    for (a, b) in masked[0].iter().zip(&want[0]) {
        assert!((a - b).abs() < 1e-6, "{masked:?} vs {want:?}");
    }
}
