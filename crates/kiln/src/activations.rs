//! Activation functions, by value or by Keras name.

use crate::error::{invalid, Result};
use candle_core::{Tensor, D};
use std::str::FromStr;

/// An elementwise (or, for softmax, last-axis) activation.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::Activation;
/// let x = Tensor::new(&[-1f32, 2.], &Device::Cpu)?;
/// assert_eq!(Activation::Relu.apply(&x)?.to_vec1::<f32>()?, vec![0.0, 2.0]);
/// let a: Activation = "tanh".parse()?;
/// assert_eq!(a, Activation::Tanh);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The identity.
    #[default]
    Linear,
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// Softmax over the last axis.
    Softmax,
    /// Log-softmax over the last axis.
    LogSoftmax,
    /// Exact GELU, `x·Φ(x)` (Keras' default, `approximate=False`).
    Gelu,
    /// `x·σ(x)`, also called swish.
    Silu,
    /// `log(1 + e^x)`.
    Softplus,
    /// `x` for positive inputs, `alpha·(e^x - 1)` otherwise, with `alpha = 1`.
    Elu,
    /// `max(x, 0.2·x)` (Keras' `leaky_relu` default slope).
    LeakyRelu,
    /// Scaled ELU, `1.0507·elu(x, 1.6733)` (Klambauer et al. 2017's constants, as Keras).
    Selu,
    /// `x / (|x| + 1)`.
    Softsign,
    /// `clip(x/6 + 1/2, 0, 1)`, Keras 3's piecewise-linear sigmoid.
    HardSigmoid,
    /// `x·hard_sigmoid(x)`, also called hard swish.
    HardSilu,
    /// `clip(x, 0, 6)`.
    Relu6,
    /// `e^x`.
    Exponential,
    /// `x·tanh(softplus(x))`.
    Mish,
    /// `log σ(x) = -softplus(-x)`.
    LogSigmoid,
    /// `clip(x, -1, 1)`.
    HardTanh,
    /// `x - tanh(x)`.
    TanhShrink,
    /// `max(x, 0) + min(e^x - 1, 0)` (Keras' `celu` with `alpha = 1`).
    Celu,
    /// `(x + √(x² + 4)) / 2` (Keras' `squareplus` with `b = 4`).
    Squareplus,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Linear => x.clone(),
            Activation::Relu => crate::layers::relu_kernel::relu_keras(x)?,
            Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
            Activation::Tanh => x.tanh()?,
            Activation::Softmax => crate::softmax::softmax_last(x)?,
            Activation::LogSoftmax => candle_nn::ops::log_softmax(x, D::Minus1)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::Silu => x.silu()?,
            Activation::Softplus => crate::losses::softplus(x)?,
            Activation::Elu => x.elu(1.0)?,
            Activation::LeakyRelu => x.mul(&mask(x.ge(0.0)?, x)?.affine(0.8, 0.2)?)?,
            Activation::Selu => x
                .elu(1.673_263_242_354_377_3)?
                .affine(1.050_700_987_355_480_5, 0.0)?,
            Activation::Softsign => x.div(&x.abs()?.affine(1.0, 1.0)?)?,
            Activation::HardSigmoid => hard_sigmoid(x)?,
            Activation::HardSilu => x.mul(&hard_sigmoid(x)?)?,
            Activation::Relu6 => relu6(x)?,
            Activation::Exponential => x.exp()?,
            Activation::Mish => x.mul(&crate::losses::softplus(x)?.tanh()?)?,
            Activation::LogSigmoid => crate::losses::softplus(&x.neg()?)?.neg()?,
            // Gradient 1 on [-1, 1], ends included, as JAX's `where(x > 1, 1, where(x < -1, -1, x))`.
            Activation::HardTanh => x
                .mul(&mask(x.ge(-1.0)?, x)?.mul(&mask(x.le(1.0)?, x)?)?)?
                .add(&mask(x.gt(1.0)?, x)?)?
                .sub(&mask(x.lt(-1.0)?, x)?)?,
            Activation::TanhShrink => x.sub(&x.tanh()?)?,
            // `where(x > 0, x, e^x - 1)`: gradient 1 at 0 (as JAX's), e^x only where x ≤ 0.
            Activation::Celu => {
                let positive = mask(x.gt(0.0)?, x)?;
                let rest = positive.affine(-1.0, 1.0)?;
                x.mul(&positive)?
                    .add(&x.mul(&rest)?.exp()?.affine(1.0, -1.0)?.mul(&rest)?)?
            }
            Activation::Squareplus => x
                .add(&x.sqr()?.affine(1.0, 4.0)?.sqrt()?)?
                .affine(0.5, 0.0)?,
        })
    }

    /// Keras' name for the activation.
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Linear => "linear",
            Activation::Relu => "relu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Softmax => "softmax",
            Activation::LogSoftmax => "log_softmax",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
            Activation::Softplus => "softplus",
            Activation::Elu => "elu",
            Activation::LeakyRelu => "leaky_relu",
            Activation::Selu => "selu",
            Activation::Softsign => "softsign",
            Activation::HardSigmoid => "hard_sigmoid",
            Activation::HardSilu => "hard_silu",
            Activation::Relu6 => "relu6",
            Activation::Exponential => "exponential",
            Activation::Mish => "mish",
            Activation::LogSigmoid => "log_sigmoid",
            Activation::HardTanh => "hard_tanh",
            Activation::TanhShrink => "tanh_shrink",
            Activation::Celu => "celu",
            Activation::Squareplus => "squareplus",
        }
    }
}

impl FromStr for Activation {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" | "none" => Activation::Linear,
            "relu" => Activation::Relu,
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            "softmax" => Activation::Softmax,
            "log_softmax" => Activation::LogSoftmax,
            "gelu" => Activation::Gelu,
            "silu" | "swish" => Activation::Silu,
            "softplus" => Activation::Softplus,
            "elu" => Activation::Elu,
            "leaky_relu" => Activation::LeakyRelu,
            "selu" => Activation::Selu,
            "softsign" => Activation::Softsign,
            "hard_sigmoid" => Activation::HardSigmoid,
            "hard_silu" | "hard_swish" => Activation::HardSilu,
            "relu6" => Activation::Relu6,
            "exponential" => Activation::Exponential,
            "mish" => Activation::Mish,
            "log_sigmoid" => Activation::LogSigmoid,
            "hard_tanh" => Activation::HardTanh,
            "tanh_shrink" => Activation::TanhShrink,
            "celu" => Activation::Celu,
            "squareplus" => Activation::Squareplus,
            other => {
                return Err(invalid(format!(
                    "unknown activation `{other}`: use linear, relu, sigmoid, tanh, softmax, \
                     log_softmax, gelu, silu, softplus, elu, leaky_relu, selu, softsign, \
                     hard_sigmoid, hard_silu, relu6, exponential, mish, log_sigmoid, hard_tanh, \
                     tanh_shrink, celu or squareplus"
                )))
            }
        })
    }
}

/// Keras 3's hard sigmoid, `relu6(x + 3) / 6`, with relu6's gradient (0 at both ends).
fn hard_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((relu6(&x.affine(1.0, 3.0)?)? / 6.0)?)
}

/// `min(max(x, 0), 6)` with JAX's gradient: 1 strictly between 0 and 6, 0 at both ends (candle's
/// `clamp` splits a tie in half).
fn relu6(x: &Tensor) -> Result<Tensor> {
    let inside = mask(x.gt(0.0)?, x)?.mul(&mask(x.lt(6.0)?, x)?)?;
    Ok(x.mul(&inside)?.add(&(mask(x.ge(6.0)?, x)? * 6.0)?)?)
}

/// A comparison of `x` (`x.ge(0.0)?`) as a 0/1 tensor of `x`'s dtype. A comparison carries no
/// gradient, so `x · mask` is a piecewise function whose tie rule is the comparison's, rather
/// than how candle splits `maximum`/`minimum` ties (half to each side).
fn mask(comparison: Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(comparison.to_dtype(x.dtype())?)
}
