//! A layer whose output feeds only a ReLU layer applies the ReLU in its own fused kernel
//! (BatchNormalization's training pass, a linear Conv2D): the training steps, the reported
//! losses and the predictions are those of the layers run one by one.

use candle_core::{DType, Device, Tensor};
use kiln::prelude::*;

/// Conv2D → BatchNormalization (when `normalized`) → ReLU → MaxPool → Dense, with the tensor
/// before the ReLU returned so that a second model can read it.
fn graph(normalized: bool) -> kiln::Result<(SymbolicTensor, SymbolicTensor, SymbolicTensor)> {
    let x = Input::new([10, 10, 2]);
    let c = Conv2D::new(6, (3, 3)).apply(&x)?;
    let n = match normalized {
        true => BatchNormalization::new().apply(&c)?,
        false => c,
    };
    let r = ActivationLayer::new(Activation::Relu).apply(&n)?;
    let p = MaxPooling2D::new((2, 2)).apply(&r)?;
    let h = Flatten::new().apply(&p)?;
    let y = Dense::new(3).apply(&h)?;
    Ok((x, n, y))
}

fn data() -> kiln::Result<Dataset> {
    let d = Device::Cpu;
    // Fixed values, the same for both models, both signs.
    let values: Vec<f64> = (0..16 * 10 * 10 * 2)
        .map(|i| (i as f64 * 0.37).sin() + 0.2)
        .collect();
    let x = Tensor::from_vec(values, (16, 10, 10, 2), &d)?;
    let labels: Vec<u32> = (0..16).map(|i| i % 3).collect();
    let y = Tensor::new(labels.as_slice(), &d)?;
    Dataset::new(x, y)
}

fn trained(normalized: bool, read_normalized: bool) -> kiln::Result<(Model, Vec<f64>)> {
    let (x, n, y) = graph(normalized)?;
    let mut model = Model::builder(&[&x], &[&y])
        .seed(3)
        .dtype(DType::F64)
        .build()?;
    if read_normalized {
        // An added term that reads the tensor before the ReLU keeps it a tensor of its own,
        // so the ReLU runs as its own layer. It adds 0 to the loss and to every gradient.
        model.add_loss("zero", move |t| Ok((t.get(&n)?.sum_all()? * 0.0)?))?;
    }
    model.compile(
        Compile::new(Adam::new(1e-2)).loss(SparseCategoricalCrossentropy::new().from_logits(true)),
    )?;
    let batch = data()?;
    let mut losses = Vec::new();
    for _ in 0..4 {
        losses.push(model.train_on_batch(&batch)?.get("loss").expect("loss"));
    }
    Ok((model, losses))
}

#[test]
fn a_relu_applied_inside_batch_normalization_trains_as_the_separate_layer() -> kiln::Result<()> {
    same_as_separate(true)
}

#[test]
fn a_relu_applied_inside_a_linear_convolution_trains_as_the_separate_layer() -> kiln::Result<()> {
    same_as_separate(false)
}

fn same_as_separate(normalized: bool) -> kiln::Result<()> {
    let (fused, fused_losses) = trained(normalized, false)?;
    let (separate, separate_losses) = trained(normalized, true)?;
    for (a, b) in fused_losses.iter().zip(&separate_losses) {
        assert!(
            (a - b).abs() <= 1e-10 * b.abs().max(1.0),
            "loss {a} against {b}"
        );
    }
    // The losses fall, so the steps did something.
    assert!(fused_losses[3] < fused_losses[0], "{fused_losses:?}");
    for (a, b) in fused.weights().iter().zip(separate.weights()) {
        assert_eq!(a.name, b.name);
        let diff = (a.var.as_tensor() - b.var.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-10, "{}: {diff}", a.name);
    }
    let x = data()?.inputs()[0].clone();
    let (a, b) = (
        fused.predict(std::slice::from_ref(&x), 8)?,
        separate.predict(&[x], 8)?,
    );
    let diff = (&a[0] - &b[0])?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(diff < 1e-10, "predict: {diff}");
    Ok(())
}
