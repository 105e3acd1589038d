//! Layers without weights: Activation, Dropout, Flatten.

use super::{CallContext, Layer};
use crate::activations::Activation;
use crate::error::{invalid, Error, Result};
use candle_core::Tensor;

/// Applies an activation function as a layer of its own.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([3]);
/// let y = ActivationLayer::new(Activation::Softmax).apply(&x)?;
/// assert_eq!(y.shape(), &[3]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct ActivationLayer {
    activation: Activation,
    name: Option<String>,
}

impl ActivationLayer {
    /// A layer applying `activation`.
    pub fn new(activation: Activation) -> Self {
        Self {
            activation,
            name: None,
        }
    }
    /// The layer's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The old spelling of `with_name`.
    #[deprecated(
        since = "0.1.0",
        note = "use `with_name`, the name setter of every kiln builder (layers, losses, metrics)"
    )]
    pub fn name(self, name: impl Into<String>) -> Self {
        self.with_name(name)
    }
}

fn one_input<'a>(layer: &str, shapes: &'a [Vec<usize>]) -> Result<&'a Vec<usize>> {
    match shapes {
        [s] => Ok(s),
        _ => Err(Error::Graph(format!(
            "{layer} takes one input, got {}",
            shapes.len()
        ))),
    }
}

impl Layer for ActivationLayer {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some((
            "Activation",
            serde_json::json!({ "activation": self.activation.as_str() }),
        ))
    }
    fn kind(&self) -> &'static str {
        "activation"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        Ok(one_input("Activation", input_shapes)?.clone())
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        self.activation.apply(&inputs[0])
    }
    fn final_activation(&self) -> Option<Activation> {
        Some(self.activation)
    }
    fn call_before_activation(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        Ok(inputs[0].clone())
    }
}

/// Zeroes a fraction `rate` of its inputs during training and scales the rest by
/// `1 / (1 - rate)`; the identity at inference. Each sample's mask is drawn from its own
/// stream ([`crate::random::SampleStreams`]), so data-parallel ranks drop what one process
/// drops.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([16]);
/// let y = Dropout::new(0.5).apply(&x)?;
/// assert!(Dropout::new(1.0).apply(&x).is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Dropout {
    rate: f64,
    name: Option<String>,
}

impl Dropout {
    /// Drops a fraction `rate` in `[0, 1)` of the values.
    pub fn new(rate: f64) -> Self {
        Self { rate, name: None }
    }
    /// The layer's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The old spelling of `with_name`.
    #[deprecated(
        since = "0.1.0",
        note = "use `with_name`, the name setter of every kiln builder (layers, losses, metrics)"
    )]
    pub fn name(self, name: impl Into<String>) -> Self {
        self.with_name(name)
    }
}

impl Layer for Dropout {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some(("Dropout", serde_json::json!({ "rate": self.rate })))
    }
    fn kind(&self) -> &'static str {
        "dropout"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        if !(0.0..1.0).contains(&self.rate) {
            return Err(invalid(format!(
                "Dropout: rate must be in [0, 1), got {}",
                self.rate
            )));
        }
        Ok(one_input("Dropout", input_shapes)?.clone())
    }
    fn call(&self, inputs: &[Tensor], ctx: &mut CallContext) -> Result<Tensor> {
        let x = &inputs[0];
        if !ctx.training || self.rate == 0.0 {
            return Ok(x.clone());
        }
        // Each sample's mask comes from its own stream (see `crate::random`).
        let mask = ctx
            .random()
            .dropout_mask(0, x.dims(), self.rate, x.dtype(), x.device())?;
        Ok(x.mul(&mask)?)
    }
}

/// Flattens every axis but the batch axis.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([8, 8]);
/// assert_eq!(Flatten::new().apply(&x)?.shape(), &[64]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Default)]
pub struct Flatten {
    name: Option<String>,
}

impl Flatten {
    /// A flattening layer.
    pub fn new() -> Self {
        Self::default()
    }
    /// The layer's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The old spelling of `with_name`.
    #[deprecated(
        since = "0.1.0",
        note = "use `with_name`, the name setter of every kiln builder (layers, losses, metrics)"
    )]
    pub fn name(self, name: impl Into<String>) -> Self {
        self.with_name(name)
    }
}

impl Layer for Flatten {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some(("Flatten", serde_json::json!({})))
    }
    fn kind(&self) -> &'static str {
        "flatten"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        Ok(vec![one_input("Flatten", input_shapes)?.iter().product()])
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let x = &inputs[0];
        let batch = x.dims()[0];
        Ok(x.reshape((batch, x.elem_count() / batch.max(1)))?)
    }
    /// Keras' Flatten does not support masking, so the mask stops here, except on samples
    /// that are flat already: Keras 3 on JAX then gets the input array back from `reshape`,
    /// with the mask attached to it.
    fn compute_mask(&self, inputs: &[Tensor], masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        Ok(match inputs[0].rank() {
            2 => masks.first().cloned().flatten(),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::StepRandom;
    use candle_core::{DType, Device};

    /// Dropout in training on a batch of 10, and on the same rows as shards 0..3 and 3..10
    /// (a rank's shards, each with its global first row), drops the very same values; another
    /// step drops others; inference is the identity.
    #[test]
    fn dropout_masks_do_not_depend_on_the_shards() {
        let layer = Dropout::new(0.5);
        let x = Tensor::arange(1f32, 81.0, &Device::Cpu)
            .unwrap()
            .reshape((10, 8))
            .unwrap();
        let run = |x: &Tensor, step: u64, first_row: usize, training: bool| {
            let streams = StepRandom::new(9, step)
                .next_pass()
                .streams("dropout", 1, first_row);
            let mut ctx = CallContext::new(training, streams);
            layer
                .call(std::slice::from_ref(x), &mut ctx)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let whole = run(&x, 4, 0, true);
        let mut split = run(&x.narrow(0, 0, 3).unwrap(), 4, 0, true);
        split.extend(run(&x.narrow(0, 3, 7).unwrap(), 4, 3, true));
        assert_eq!(split, whole);
        assert_ne!(run(&x, 5, 0, true), whole);
        let values = x.to_vec2::<f32>().unwrap();
        for (row, input) in whole.iter().zip(&values) {
            for (y, v) in row.iter().zip(input) {
                assert!(*y == 0.0 || *y == 2.0 * v, "{y} from {v}");
            }
        }
        assert!(whole.iter().flatten().any(|y| *y == 0.0));
        assert_eq!(run(&x, 4, 0, false), values);
        let f64_out = {
            let streams = StepRandom::new(9, 4).next_pass().streams("dropout", 1, 0);
            let mut ctx = CallContext::new(true, streams);
            let x = x.to_dtype(DType::F64).unwrap();
            layer
                .call(&[x], &mut ctx)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap()
        };
        let zeros = |m: &[Vec<f32>]| m.iter().flatten().map(|v| *v == 0.0).collect::<Vec<_>>();
        let zeros64: Vec<bool> = f64_out.iter().flatten().map(|v| *v == 0.0).collect();
        assert_eq!(zeros64, zeros(&whole), "f64 and f32 drop the same values");
    }
}
