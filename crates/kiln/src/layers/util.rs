//! Helpers shared by the layers: argument checks, weight creation, padding arithmetic.

use super::{BuildContext, Weight};
use crate::error::{invalid, Error, Result};
use crate::initializers::Initializer;
use crate::regularizers::SharedRegularizer;
use candle_core::{DType, Tensor, Var};

/// The single input shape of a one-input layer, or a graph error naming the layer.
pub(crate) fn one_input<'a>(layer: &str, shapes: &'a [Vec<usize>]) -> Result<&'a Vec<usize>> {
    match shapes {
        [s] => Ok(s),
        _ => Err(Error::Graph(format!(
            "{layer} takes one input, got {}",
            shapes.len()
        ))),
    }
}

/// Checks that a one-input layer's input has `rank` axes besides the batch axis.
pub(crate) fn input_of_rank<'a>(
    layer: &str,
    shapes: &'a [Vec<usize>],
    rank: usize,
    layout: &str,
) -> Result<&'a Vec<usize>> {
    let shape = one_input(layer, shapes)?;
    if shape.len() != rank {
        return Err(Error::Graph(format!(
            "{layer} expects samples of shape {layout} ({rank} axes besides the batch), got {shape:?}"
        )));
    }
    Ok(shape)
}

/// Creates a weight named `<layer>/<weight>` drawn from `init`.
pub(crate) fn make_weight(
    layer: &str,
    weight: &str,
    shape: &[usize],
    init: Initializer,
    trainable: bool,
    regularizer: Option<SharedRegularizer>,
    ctx: &mut BuildContext,
) -> Result<Weight> {
    let value = init.init(shape, ctx.dtype, ctx.device, ctx.rng)?;
    Ok(Weight::new(
        format!("{layer}/{weight}"),
        Var::from_tensor(&value)?,
        trainable,
    )
    .with_regularizer(regularizer))
}

/// The weight, or a state error saying the layer was used before it was built.
pub(crate) fn built<'a>(w: &'a Option<Weight>, layer: &str) -> Result<&'a Weight> {
    w.as_ref()
        .ok_or_else(|| Error::State(format!("{layer} used before it was built")))
}

/// The mask as 0/1 values of `dtype`.
pub(crate) fn mask_as(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(mask.ne(0.0)?.to_dtype(dtype)?)
}

/// How a convolution or pooling window treats the borders.
///
/// ```
/// use kiln::layers::Padding;
/// let p: Padding = "same".parse()?;
/// assert_eq!(p, Padding::Same);
/// assert!("full".parse::<Padding>().is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// No padding: windows lie inside the input (Keras' default).
    #[default]
    Valid,
    /// Zero padding so that the output has `ceil(n / stride)` positions; as TensorFlow and
    /// Keras, the extra row or column goes to the end.
    Same,
    /// Left padding only, so an output never sees later steps (Conv1D only).
    Causal,
}

impl std::str::FromStr for Padding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "valid" => Ok(Padding::Valid),
            "same" => Ok(Padding::Same),
            "causal" => Ok(Padding::Causal),
            other => Err(invalid(format!(
                "unknown padding `{other}`: use valid, same or causal"
            ))),
        }
    }
}

/// The geometry of a window sliding along one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Axis {
    /// Zeros (or the pooling's neutral value) added before the input.
    pub(crate) before: usize,
    /// Padding added after the input.
    pub(crate) after: usize,
    /// The number of output positions.
    pub(crate) out: usize,
}

/// The padding and output length of a window of `size` with `stride` and `dilation` sliding over
/// `n` positions; `None` when the input is too short.
pub(crate) fn window_axis(
    n: usize,
    size: usize,
    stride: usize,
    dilation: usize,
    padding: Padding,
) -> Option<Axis> {
    let span = (size - 1) * dilation + 1;
    match padding {
        Padding::Valid => (n >= span).then(|| Axis {
            before: 0,
            after: 0,
            out: (n - span) / stride + 1,
        }),
        Padding::Same => {
            let out = n.div_ceil(stride);
            let total = ((out - 1) * stride + span).saturating_sub(n);
            Some(Axis {
                before: total / 2,
                after: total - total / 2,
                out,
            })
        }
        Padding::Causal => {
            let before = span - 1;
            Some(Axis {
                before,
                after: 0,
                out: (n + before - span) / stride + 1,
            })
        }
    }
}

/// Pads `x` along `dim` with `before`/`after` copies of `value`.
pub(crate) fn pad_axis(
    x: &Tensor,
    dim: usize,
    before: usize,
    after: usize,
    value: f64,
) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let mut parts = Vec::with_capacity(3);
    let block = |len: usize| -> Result<Tensor> {
        let mut shape = x.dims().to_vec();
        shape[dim] = len;
        Ok(Tensor::full(value, shape, x.device())?.to_dtype(x.dtype())?)
    };
    if before > 0 {
        parts.push(block(before)?);
    }
    parts.push(x.clone());
    if after > 0 {
        parts.push(block(after)?);
    }
    Ok(Tensor::cat(&parts, dim)?)
}

/// Positions `start, start + step, …` (`count` of them) of `x` along `dim`.
pub(crate) fn strided(
    x: &Tensor,
    dim: usize,
    start: usize,
    step: usize,
    count: usize,
) -> Result<Tensor> {
    if step == 1 {
        return Ok(x.narrow(dim, start, count)?);
    }
    let idx: Vec<u32> = (0..count).map(|o| (start + o * step) as u32).collect();
    let idx = Tensor::from_vec(idx, count, x.device())?;
    // candle's index_select reads contiguous tensors only (a window narrowed off the end is not).
    Ok(x.contiguous()?.index_select(&idx, dim)?)
}

/// Checks that every value in a list of sizes is at least 1.
pub(crate) fn check_positive(layer: &str, what: &str, values: &[usize]) -> Result<()> {
    if values.contains(&0) {
        return Err(invalid(format!(
            "{layer}: {what} must be at least 1, got {values:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_puts_the_extra_element_at_the_end() {
        // n = 5, k = 2, s = 2: ceil(5/2) = 3 outputs need (3-1)*2 + 2 = 6 positions: pad 0 + 1.
        assert_eq!(
            window_axis(5, 2, 2, 1, Padding::Same),
            Some(Axis {
                before: 0,
                after: 1,
                out: 3
            })
        );
        // n = 4, k = 3, s = 1: total 2, one on each side.
        assert_eq!(
            window_axis(4, 3, 1, 1, Padding::Same),
            Some(Axis {
                before: 1,
                after: 1,
                out: 4
            })
        );
        // Dilation 2 makes a 3-tap window span 5.
        assert_eq!(window_axis(4, 3, 1, 2, Padding::Valid), None);
        assert_eq!(
            window_axis(6, 3, 1, 2, Padding::Causal),
            Some(Axis {
                before: 4,
                after: 0,
                out: 6
            })
        );
    }
}

/// What the tests of the fused CPU kernels share: random inputs and weights, the largest
/// difference between two tensors, and the gradients of Σ out·w.
#[cfg(test)]
pub(crate) mod fused_check {
    use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng};

    /// Values uniform in [-1, 1), drawn with `seed`.
    pub(crate) fn random(shape: &[usize], seed: u64, dtype: DType) -> Var {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
        let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
    }

    /// The largest absolute difference of two tensors of one shape.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The gradients of Σ out·w: every element of `out` weighted differently.
    pub(crate) fn weighted_sum_grads(out: Tensor, w: &Tensor) -> GradStore {
        (out * w).unwrap().sum_all().unwrap().backward().unwrap()
    }
}
