//! Keras' `data_format="channels_first"` for kiln's channels-last layers with spatial axes.
//!
//! The layer's weights are the same in either format (Keras keeps a convolution's kernel as
//! `[k.., in, out]` for both), so a channels-first layer is the channels-last one between two
//! transposes: the channel axis moves to the end on the way in and back to the front on the way
//! out. One wrapper serves every such layer (convolutions, pooling, global pooling, Flatten)
//! instead of a second code path in each.

use super::{BuildContext, CallContext, Layer, LayerExt, Weight};
use crate::error::{Error, Result};
use crate::graph::SharedLayer;
use crate::regularizers::SharedRegularizer;
use candle_core::Tensor;

/// A channels-last layer applied to channels-first samples (`[C, steps]`, `[C, H, W]`), as
/// Keras' `data_format="channels_first"`.
///
/// ```
/// use kiln::prelude::*;
/// use kiln::layers::ChannelsFirst;
/// let x = Input::new([3, 8, 8]); // channels, height, width
/// let y = ChannelsFirst::new(Conv2D::new(4, (3, 3))).apply(&x)?;
/// assert_eq!(y.shape(), &[4, 6, 6]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct ChannelsFirst {
    inner: Box<dyn Layer>,
}

impl ChannelsFirst {
    /// Wraps a channels-last layer (Conv1D, Conv2D, a pooling layer, Flatten).
    pub fn new(layer: impl Layer + 'static) -> Self {
        Self {
            inner: Box::new(layer),
        }
    }

    fn name(&self) -> &str {
        self.inner.given_name().unwrap_or(self.inner.kind())
    }

    /// `[C, s..]` → `[s.., C]` (sample shapes, without the batch axis).
    fn last(&self, shape: &[usize]) -> Result<Vec<usize>> {
        if shape.len() < 2 {
            return Err(Error::Graph(format!(
                "layer `{}` with data_format = channels_first needs samples of a channel axis \
                 and at least one spatial axis, got shape {shape:?}",
                self.name()
            )));
        }
        Ok(shape[1..].iter().chain(&shape[..1]).copied().collect())
    }
}

/// The layer, inside [`ChannelsFirst`] when `first` (Keras' `data_format="channels_first"`),
/// for the Keras importer and the run-file builder alike.
pub(crate) fn in_format<L: Layer + 'static>(layer: L, first: bool) -> SharedLayer {
    if first {
        ChannelsFirst::new(layer).shared()
    } else {
        layer.shared()
    }
}

/// `[s.., C]` → `[C, s..]`; a flat output (global pooling, Flatten) stays as it is.
fn to_first(shape: &[usize]) -> Vec<usize> {
    match shape.split_last() {
        Some((c, rest)) if !rest.is_empty() => {
            std::iter::once(*c).chain(rest.iter().copied()).collect()
        }
        _ => shape.to_vec(),
    }
}

/// The batch tensor `[N, C, s..]` as `[N, s.., C]`.
fn tensor_last(x: &Tensor) -> Result<Tensor> {
    let mut order = vec![0];
    order.extend(2..x.rank());
    order.push(1);
    Ok(x.permute(order)?.contiguous()?)
}

/// The batch tensor `[N, s.., C]` as `[N, C, s..]` (a `[N, C]` one unchanged).
fn tensor_first(x: &Tensor) -> Result<Tensor> {
    if x.rank() <= 2 {
        return Ok(x.clone());
    }
    let last = x.rank() - 1;
    let order: Vec<usize> = [0, last].into_iter().chain(1..last).collect();
    Ok(x.permute(order)?.contiguous()?)
}

fn all_last(inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    inputs.iter().map(tensor_last).collect()
}

impl Layer for ChannelsFirst {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn given_name(&self) -> Option<&str> {
        self.inner.given_name()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let last = input_shapes
            .iter()
            .map(|s| self.last(s))
            .collect::<Result<Vec<_>>>()?;
        Ok(to_first(&self.inner.output_shape(&last)?))
    }
    fn build(
        &mut self,
        name: &str,
        input_shapes: &[Vec<usize>],
        ctx: &mut BuildContext,
    ) -> Result<()> {
        let last = input_shapes
            .iter()
            .map(|s| self.last(s))
            .collect::<Result<Vec<_>>>()?;
        self.inner.build(name, &last, ctx)
    }
    fn weights(&self) -> Vec<Weight> {
        self.inner.weights()
    }
    fn call(&self, inputs: &[Tensor], ctx: &mut CallContext) -> Result<Tensor> {
        tensor_first(&self.inner.call(&all_last(inputs)?, ctx)?)
    }
    fn call_with_masks(
        &self,
        inputs: &[Tensor],
        masks: &[Option<Tensor>],
        ctx: &mut CallContext,
    ) -> Result<Tensor> {
        tensor_first(&self.inner.call_with_masks(&all_last(inputs)?, masks, ctx)?)
    }
    fn takes_mask(&self) -> bool {
        self.inner.takes_mask()
    }
    fn compute_mask(&self, inputs: &[Tensor], masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        self.inner.compute_mask(&all_last(inputs)?, masks)
    }
    fn final_activation(&self) -> Option<crate::Activation> {
        self.inner.final_activation()
    }
    fn call_before_activation(&self, inputs: &[Tensor], ctx: &mut CallContext) -> Result<Tensor> {
        tensor_first(&self.inner.call_before_activation(&all_last(inputs)?, ctx)?)
    }
    fn samples_independent(&self) -> bool {
        self.inner.samples_independent()
    }
    fn activity_regularizer(&self) -> Option<&SharedRegularizer> {
        self.inner.activity_regularizer()
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        let (class, mut config) = self.inner.keras_config()?;
        config
            .as_object_mut()?
            .insert("data_format".into(), "channels_first".into());
        Some((class, config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{GlobalAveragePooling2D, MaxPooling1D};
    use candle_core::{DType, Device};

    /// The wrapped layer sees the channels last and gives its result back channels first:
    /// max pooling over the steps of `[N, C, steps]` pools each channel's row.
    #[test]
    fn the_channel_axis_moves_to_the_end_and_back() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 5., 2., 0.], [-1., -3., 4., 8.]]], &dev).unwrap();
        let pool = ChannelsFirst::new(MaxPooling1D::new(2));
        assert_eq!(pool.output_shape(&[vec![2, 4]]).unwrap(), vec![2, 2]);
        let mut ctx = CallContext::new(false, crate::random::SampleStreams::new(0, 0));
        let y = pool.call(&[x], &mut ctx).unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap(), [[[5., 2.], [-1., 8.]]]);

        let gap = ChannelsFirst::new(GlobalAveragePooling2D::new().keepdims(true));
        assert_eq!(gap.output_shape(&[vec![3, 2, 2]]).unwrap(), vec![3, 1, 1]);
        let x = Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((1, 3, 2, 2))
            .unwrap();
        let y = gap.call(&[x], &mut ctx).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.5, 5.5, 9.5]
        );
        assert_eq!(y.dtype(), DType::F32);
    }

    #[test]
    fn samples_without_a_spatial_axis_are_an_error_naming_the_layer() {
        let pool = ChannelsFirst::new(MaxPooling1D::new(2).with_name("pool"));
        let e = pool.output_shape(&[vec![4]]).unwrap_err().to_string();
        assert!(e.contains("`pool`") && e.contains("channels_first"), "{e}");
    }
}
