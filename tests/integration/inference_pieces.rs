//! `predict` runs a large batch as pieces that stay in cache, on several threads at once, when
//! every layer computes each sample alone (`Layer::samples_independent`): its results must be
//! those of each sample predicted alone, and a layer of the user's that mixes samples must
//! still see the whole batch.

use kiln::prelude::*;
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Each row of `whole` against the same sample predicted alone (`predict` at batch 1).
fn assert_rows_match_samples_alone(model: &Model, x: &Tensor) {
    let n = x.dims()[0];
    let whole = model.predict(std::slice::from_ref(x), n).unwrap();
    let alone = model.predict(std::slice::from_ref(x), 1).unwrap();
    for (w, a) in whole.iter().zip(&alone) {
        let (w, a) = (
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(w.len(), a.len());
        for (i, (p, q)) in w.iter().zip(&a).enumerate() {
            assert!(
                (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                "element {i}: {p} in the batch, {q} alone"
            );
        }
    }
}

/// A convolutional model with two outputs whose first activation (38·38·16 floats, 92 KB a
/// sample) makes a piece of about 22 samples: a batch of 50 runs as three pieces.
#[test]
fn convolutional_predictions_in_pieces_equal_each_sample_alone() {
    let x = Input::new([40, 40, 3]);
    let h = Conv2D::new(16, (3, 3))
        .activation(Activation::Relu)
        .apply(&x)
        .unwrap();
    let h = MaxPooling2D::new((2, 2)).apply(&h).unwrap();
    let h = Conv2D::new(8, (3, 3)).apply(&h).unwrap();
    let h = BatchNormalization::new().apply(&h).unwrap();
    let h = ActivationLayer::new(Activation::Relu).apply(&h).unwrap();
    let f = Flatten::new().apply(&h).unwrap();
    let a = Dense::new(3)
        .activation(Activation::Softmax)
        .apply(&f)
        .unwrap();
    let b = Dense::new(1).apply(&f).unwrap();
    let model = Model::new(&[x], &[a, b]).unwrap();
    assert_rows_match_samples_alone(&model, &random(&[50, 40, 40, 3], 1));
}

/// A recurrent model with a mask (token 0 is padding), 200 steps of 256 features a sample.
#[test]
fn recurrent_predictions_in_pieces_equal_each_sample_alone() {
    let x = Input::new([200]);
    let e = Embedding::new(50, 256).mask_zero(true).apply(&x).unwrap();
    let h = Lstm::new(16).apply(&e).unwrap();
    let y = Dense::new(2).apply(&h).unwrap();
    let model = Model::new(&[x], &[y]).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let tokens: Vec<f32> = (0..40 * 200)
        .map(|i| match i % 200 >= 150 + (i / 200) % 50 {
            true => 0.0,
            false => rng.random_range(1..50) as f32,
        })
        .collect();
    let tokens = Tensor::from_vec(tokens, (40, 200), &Device::Cpu).unwrap();
    assert_rows_match_samples_alone(&model, &tokens);
}

/// `x - mean over the batch`: a layer that mixes samples, which keeps the default
/// `samples_independent() == false`.
struct Center;

impl Layer for Center {
    fn kind(&self) -> &'static str {
        "center"
    }
    fn given_name(&self) -> Option<&str> {
        None
    }
    fn output_shape(&self, shapes: &[Vec<usize>]) -> kiln::Result<Vec<usize>> {
        Ok(shapes[0].clone())
    }
    fn call(
        &self,
        inputs: &[Tensor],
        _ctx: &mut kiln::layers::CallContext,
    ) -> kiln::Result<Tensor> {
        let x = &inputs[0];
        Ok(x.broadcast_sub(&x.mean_keepdim(0)?)?)
    }
}

#[test]
fn a_layer_of_the_users_that_mixes_samples_sees_the_whole_batch() {
    let build = |center: bool| {
        let x = Input::new([40, 40, 3]);
        let mut h = Conv2D::new(16, (3, 3)).apply(&x).unwrap();
        if center {
            h = Center.apply(&h).unwrap();
        }
        let y = Flatten::new().apply(&h).unwrap();
        Model::new(&[x], &[y]).unwrap()
    };
    let (centered, plain) = (build(true), build(false));
    let x = random(&[50, 40, 40, 3], 3);
    let got = centered.predict(std::slice::from_ref(&x), 50).unwrap();
    let features = plain.predict(std::slice::from_ref(&x), 50).unwrap();
    let want = features[0]
        .broadcast_sub(&features[0].mean_keepdim(0).unwrap())
        .unwrap();
    let diff = (&got[0] - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "the centred features differ by {diff}");
}
