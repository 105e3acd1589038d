//! Keras 3 weights-only files (`model.save_weights`) onto kiln models built with the same
//! architecture: `Model::load_keras_weights` against real Keras 3.15.1
//! (tests/fixtures/keras/weights_only.weights.h5 and its predictions, written by
//! make_keras_weights.py), and the refusals of files that do not fit or point outside.

use candle_core::{DType, Device, Tensor};
use kiln::prelude::*;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/keras/{name}"))
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-keras-weights-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

fn tensor(v: &Value) -> Tensor {
    let mut values = Vec::new();
    flat(v, &mut values);
    let mut shape = Vec::new();
    let mut at = v;
    while let Value::Array(a) = at {
        shape.push(a.len());
        at = &a[0];
    }
    let values: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The architecture of make_keras_weights.py, built in kiln (names of kiln's own: Keras finds
/// weights by its layer order and classes, not by name). `hidden` units can be changed to
/// build one that does not fit.
fn architecture(hidden: usize) -> Model {
    let seq = Input::named("seq", [6, 3]);
    let feat = Input::named("feat", [4]);
    let h = Conv1D::new(5, 2)
        .activation(Activation::Relu)
        .apply(&seq)
        .unwrap();
    let h = Lstm::new(4).return_sequences(true).apply(&h).unwrap();
    let h = Gru::new(3).apply(&h).unwrap();
    let g = Dense::new(hidden)
        .activation(Activation::Tanh)
        .with_name("hidden")
        .apply(&feat)
        .unwrap();
    let g = BatchNormalization::new().apply(&g).unwrap();
    let c = Concatenate::new().apply_many(&[&h, &g]).unwrap();
    let y = Dense::new(2).with_name("out").apply(&c).unwrap();
    Model::builder(&[seq, feat], &[y]).seed(5).build().unwrap()
}

#[test]
fn a_keras_weights_file_loads_onto_the_same_architecture() {
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("weights_only.json")).unwrap())
            .unwrap();
    let model = architecture(6);
    model
        .load_keras_weights(fixture("weights_only.weights.h5"))
        .unwrap();
    let inputs: Vec<Tensor> = case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(tensor)
        .collect();
    let got = values(&model.predict(&inputs, 8).unwrap()[0]);
    let mut want = Vec::new();
    flat(&case["predictions"][0], &mut want);
    assert_eq!(got.len(), want.len());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(
            (w - g).abs() <= 1e-4 * w.abs().max(1.0),
            "prediction {i}: Keras {w}, kiln {g}"
        );
    }
    // kiln's own export of the model holds the same weights file layout: it loads back.
    let path = temp("again.keras");
    model.save_keras(&path).unwrap();
    let other = architecture(6);
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    let mut h5 = Vec::new();
    zip.by_name("model.weights.h5")
        .unwrap()
        .read_to_end(&mut h5)
        .unwrap();
    let weights = temp("again.weights.h5");
    std::fs::write(&weights, h5).unwrap();
    other.load_keras_weights(&weights).unwrap();
    assert_eq!(values(&other.predict(&inputs, 8).unwrap()[0]), got);
}

#[test]
fn a_weights_file_that_does_not_fit_changes_nothing() {
    let model = architecture(7);
    let before: Vec<Vec<f64>> = model
        .weights()
        .iter()
        .map(|w| values(w.var.as_tensor()))
        .collect();
    let msg = model
        .load_keras_weights(fixture("weights_only.weights.h5"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("hidden/kernel"), "{msg}");
    let after: Vec<Vec<f64>> = model
        .weights()
        .iter()
        .map(|w| values(w.var.as_tensor()))
        .collect();
    assert_eq!(before, after, "weights changed by a refused file");
    // Another architecture altogether: a layer with no group in the file.
    let x = Input::new([4]);
    let y = Dense::new(2).apply(&x).unwrap();
    let z = Dense::new(2).apply(&y).unwrap();
    let w = Dense::new(2).apply(&z).unwrap();
    let small = Model::new(&[x], &[w]).unwrap();
    let msg = small
        .load_keras_weights(fixture("weights_only.weights.h5"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("layers/dense_2/vars"), "{msg}");
    // Not HDF5 at all.
    let junk = temp("junk.weights.h5");
    std::fs::write(&junk, b"not an hdf5 file").unwrap();
    assert!(model.load_keras_weights(&junk).is_err());
}

/// The weights of the hostile fixtures (a dataset behind a soft or an external link, one whose
/// data the file does not hold), as weights-only files: refused, naming the place.
#[test]
fn hostile_weights_files_are_refused() {
    for name in [
        "hostile_soft_link",
        "hostile_external_link",
        "hostile_unallocated",
    ] {
        let mut zip =
            zip::ZipArchive::new(std::fs::File::open(fixture(&format!("{name}.keras"))).unwrap())
                .unwrap();
        let mut h5 = Vec::new();
        zip.by_name("model.weights.h5")
            .unwrap()
            .read_to_end(&mut h5)
            .unwrap();
        let path = temp(&format!("{name}.weights.h5"));
        std::fs::write(&path, h5).unwrap();
        let x = Input::new([2]);
        let y = Dense::new(1).apply(&x).unwrap();
        let model = Model::new(&[x], &[y]).unwrap();
        let msg = model.load_keras_weights(&path).unwrap_err().to_string();
        assert!(msg.contains("layers/dense/vars"), "{name}: {msg}");
    }
}

/// Weights files are read onto models without nested models so far: one with a nested model
/// is refused by name, its weights untouched.
#[test]
fn a_model_with_a_nested_model_is_refused_by_name() {
    let build = |seed: u64| {
        let xi = Input::new([5]);
        let h = Dense::new(3).apply(&xi).unwrap();
        let encoder = Model::builder(&[xi], &[h])
            .name("encoder")
            .seed(seed)
            .build()
            .unwrap();
        let x = Input::new([5]);
        let y = encoder.apply(&x).unwrap();
        let y = Dense::new(1).with_name("head").apply(&y).unwrap();
        Model::builder(&[x], &[y]).seed(seed).build().unwrap()
    };
    let (a, b) = (build(1), build(2));
    let archive = temp("nested.keras");
    a.save_keras(&archive).unwrap();
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&archive).unwrap()).unwrap();
    let mut h5 = Vec::new();
    zip.by_name("model.weights.h5")
        .unwrap()
        .read_to_end(&mut h5)
        .unwrap();
    let weights = temp("nested.weights.h5");
    std::fs::write(&weights, h5).unwrap();
    let before: Vec<Vec<f32>> = b
        .weights()
        .iter()
        .map(|w| w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let err = b.load_keras_weights(&weights).unwrap_err().to_string();
    assert!(err.contains("`encoder`") && err.contains("nested"), "{err}");
    let after: Vec<Vec<f32>> = b
        .weights()
        .iter()
        .map(|w| w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_eq!(before, after);
}
