//! Reshape: a new shape for each sample.

use super::util::one_input;
use super::{CallContext, Layer};
use crate::error::{Error, Result};
use candle_core::Tensor;

/// Gives each sample a new shape with the same number of values; one axis may be `-1`, inferred
/// from the others. As in Keras, the batch axis is left out and the mask stops here.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([64]);
/// assert_eq!(Reshape::new([8, 8, 1]).apply(&x)?.shape(), &[8, 8, 1]);
/// assert_eq!(Reshape::new([-1, 16]).apply(&x)?.shape(), &[4, 16]);
/// assert!(Reshape::new([7, -1]).apply(&x).is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Reshape {
    target: Vec<isize>,
    name: Option<String>,
}

impl Reshape {
    /// Samples take `target_shape` (batch axis left out; at most one `-1`).
    pub fn new(target_shape: impl Into<Vec<isize>>) -> Self {
        Self {
            target: target_shape.into(),
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

    fn resolve(&self, input: &[usize]) -> Result<Vec<usize>> {
        let total: usize = input.iter().product();
        let unknown = self.target.iter().filter(|&&d| d == -1).count();
        let bad = || {
            Error::Graph(format!(
                "Reshape: samples of shape {input:?} ({total} values) cannot take the shape {:?}",
                self.target
            ))
        };
        if unknown > 1 || self.target.iter().any(|&d| d == 0 || d < -1) {
            return Err(bad());
        }
        let known: usize = self
            .target
            .iter()
            .filter(|&&d| d > 0)
            .map(|&d| d as usize)
            .product();
        let fill = if unknown == 1 {
            if known == 0 || !total.is_multiple_of(known) {
                return Err(bad());
            }
            total / known
        } else {
            if known != total {
                return Err(bad());
            }
            0
        };
        Ok(self
            .target
            .iter()
            .map(|&d| if d == -1 { fill } else { d as usize })
            .collect())
    }
}

impl Layer for Reshape {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some((
            "Reshape",
            serde_json::json!({ "target_shape": self.target }),
        ))
    }
    fn kind(&self) -> &'static str {
        "reshape"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        self.resolve(one_input("Reshape", input_shapes)?)
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let x = &inputs[0];
        let mut shape = vec![x.dims()[0]];
        shape.extend(self.resolve(&x.dims()[1..])?);
        Ok(x.reshape(shape)?)
    }
    /// Keras' Reshape does not support masking, so the mask stops here, except where the
    /// target is the input's own shape: Keras 3 on JAX then gets the input array back from
    /// `reshape`, with the mask attached to it, and the layers after it see that mask.
    fn compute_mask(&self, inputs: &[Tensor], masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        let sample = &inputs[0].dims()[1..];
        Ok(match self.resolve(sample)? == sample {
            true => masks.first().cloned().flatten(),
            false => None,
        })
    }
}

/// Reorders the axes of each sample, as Keras' `Permute`: `dims` lists the sample axes,
/// numbered from 1 (the batch axis stays first).
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([3, 4, 5]);
/// assert_eq!(Permute::new([2, 1, 3]).apply(&x)?.shape(), &[4, 3, 5]);
/// assert!(Permute::new([1, 1, 3]).apply(&x).is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Permute {
    dims: Vec<usize>,
    name: Option<String>,
}

impl Permute {
    /// Samples' axes reordered to `dims` (a permutation of `1..=rank`).
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Self {
            dims: dims.into(),
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

    fn check(&self, rank: usize) -> Result<()> {
        let mut seen = vec![false; rank + 1];
        let ok = self.dims.len() == rank
            && self
                .dims
                .iter()
                .all(|&d| (1..=rank).contains(&d) && !std::mem::replace(&mut seen[d], true));
        if ok {
            Ok(())
        } else {
            Err(Error::Graph(format!(
                "Permute: dims {:?} are not a permutation of the sample axes 1..={rank}",
                self.dims
            )))
        }
    }
}

impl Layer for Permute {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some(("Permute", serde_json::json!({ "dims": self.dims })))
    }
    fn kind(&self) -> &'static str {
        "permute"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let input = one_input("Permute", input_shapes)?;
        self.check(input.len())?;
        Ok(self.dims.iter().map(|&d| input[d - 1]).collect())
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let x = &inputs[0];
        self.check(x.rank() - 1)?;
        let mut order = vec![0];
        order.extend(self.dims.iter().copied());
        Ok(x.permute(order)?.contiguous()?)
    }
    /// Keras' Permute does not support masking: the mask stops here, as after a Reshape (a
    /// mask over the steps would not follow them to another axis). The identity order is the
    /// exception: Keras 3 on JAX gets the input array back from `transpose`, with its mask.
    fn compute_mask(&self, _inputs: &[Tensor], masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        let identity = self.dims.iter().enumerate().all(|(i, &d)| d == i + 1);
        Ok(match identity {
            true => masks.first().cloned().flatten(),
            false => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Flatten;
    use candle_core::{DType, Device};

    /// As Keras 3 on JAX: a Reshape to the input's own shape (spelled out or with -1), an
    /// identity Permute and a Flatten of flat samples pass the mask on unchanged; any change of
    /// shape or order stops it.
    #[test]
    fn only_layers_that_change_nothing_pass_the_mask_on() {
        let dev = Device::Cpu;
        let seq = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let flat = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 0.], [1., 0., 0.]], &dev).unwrap();
        let row_mask = Tensor::new(&[1f32, 0.], &dev).unwrap();
        let passed = |layer: &dyn Layer, x: &Tensor, m: &Tensor| {
            let out = layer
                .compute_mask(std::slice::from_ref(x), &[Some(m.clone())])
                .unwrap();
            out.map(|o| {
                o.to_vec2::<f32>()
                    .unwrap_or_else(|_| vec![o.to_vec1().unwrap()])
            })
        };
        let kept = Some(mask.to_vec2::<f32>().unwrap());
        for target in [vec![3, 4], vec![-1, 4], vec![3, -1]] {
            assert_eq!(
                passed(&Reshape::new(target.clone()), &seq, &mask),
                kept,
                "{target:?}"
            );
        }
        for target in [vec![4, 3], vec![12], vec![-1, 2], vec![3, 2, 2]] {
            assert_eq!(
                passed(&Reshape::new(target.clone()), &seq, &mask),
                None,
                "{target:?}"
            );
        }
        assert_eq!(passed(&Permute::new([1, 2]), &seq, &mask), kept);
        assert_eq!(passed(&Permute::new([2, 1]), &seq, &mask), None);
        assert_eq!(passed(&Flatten::new(), &seq, &mask), None);
        assert_eq!(
            passed(&Flatten::new(), &flat, &row_mask),
            Some(vec![vec![1.0, 0.0]])
        );
        // No mask in, none out.
        assert!(Reshape::new([3, 4])
            .compute_mask(&[seq], &[None])
            .unwrap()
            .is_none());
    }
}
