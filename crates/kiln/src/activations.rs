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
}

impl Activation {
    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Linear => x.clone(),
            Activation::Relu => match crate::layers::relu_kernel::relu(x)? {
                Some(y) => y,
                None => x.relu()?,
            },
            Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
            Activation::Tanh => x.tanh()?,
            Activation::Softmax => crate::softmax::softmax_last(x)?,
            Activation::LogSoftmax => candle_nn::ops::log_softmax(x, D::Minus1)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::Silu => x.silu()?,
            Activation::Softplus => crate::losses::softplus(x)?,
            Activation::Elu => x.elu(1.0)?,
            Activation::LeakyRelu => x.maximum(&x.affine(0.2, 0.0)?)?,
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
            other => {
                return Err(invalid(format!(
                    "unknown activation `{other}`: use linear, relu, sigmoid, tanh, softmax, \
                     log_softmax, gelu, silu, softplus, elu or leaky_relu"
                )))
            }
        })
    }
}
