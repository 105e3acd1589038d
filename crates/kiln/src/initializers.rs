//! Weight initializers, drawn from a seeded generator so that the same seed gives the same model.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use rand::distr::{Distribution, Uniform};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::StandardNormal;

/// How a weight's first values are drawn.
///
/// ```
/// use candle_core::{DType, Device};
/// use kiln::Initializer;
/// use rand::SeedableRng;
/// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
/// let w = Initializer::GlorotUniform.init(&[4, 3], DType::F32, &Device::Cpu, &mut rng)?;
/// let limit = (6.0f32 / 7.0).sqrt();
/// assert!(w.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.abs() <= limit));
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Initializer {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Uniform in `±sqrt(6 / (fan_in + fan_out))` (Keras' default for kernels).
    GlorotUniform,
    /// Normal with standard deviation `sqrt(2 / (fan_in + fan_out))`, truncated at two deviations.
    GlorotNormal,
    /// Uniform in `±sqrt(6 / fan_in)`.
    HeUniform,
    /// Normal with standard deviation `sqrt(2 / fan_in)`, truncated at two deviations.
    HeNormal,
    /// Uniform in `[-limit, limit]`.
    RandomUniform {
        /// The bound.
        limit: f64,
    },
}

/// `(fan_in, fan_out)` as Keras computes them: the receptive field times the last two axes.
fn fans(shape: &[usize]) -> (f64, f64) {
    match shape.len() {
        0 => (1.0, 1.0),
        1 => (shape[0] as f64, shape[0] as f64),
        n => {
            let receptive: usize = shape[..n - 2].iter().product();
            (
                (shape[n - 2] * receptive) as f64,
                (shape[n - 1] * receptive) as f64,
            )
        }
    }
}

fn truncated_normal(n: usize, std: f64, rng: &mut StdRng) -> Vec<f64> {
    // Keras' truncated normal rescales so the standard deviation after truncation is `std`.
    let scale = std / 0.879_625_661_034_239_8;
    (0..n)
        .map(|_| loop {
            let z: f64 = rng.sample(StandardNormal);
            if z.abs() <= 2.0 {
                break z * scale;
            }
        })
        .collect()
}

impl Initializer {
    /// Draws a tensor of `shape`.
    pub fn init(
        self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let (fan_in, fan_out) = fans(shape);
        let uniform = |limit: f64, rng: &mut StdRng| -> Vec<f64> {
            let dist = Uniform::new_inclusive(-limit, limit).expect("finite limit");
            (0..n).map(|_| dist.sample(rng)).collect()
        };
        let values: Vec<f64> = match self {
            Initializer::Zeros => vec![0.0; n],
            Initializer::Ones => vec![1.0; n],
            Initializer::GlorotUniform => uniform((6.0 / (fan_in + fan_out)).sqrt(), rng),
            Initializer::HeUniform => uniform((6.0 / fan_in).sqrt(), rng),
            Initializer::RandomUniform { limit } => uniform(limit, rng),
            Initializer::GlorotNormal => {
                truncated_normal(n, (2.0 / (fan_in + fan_out)).sqrt(), rng)
            }
            Initializer::HeNormal => truncated_normal(n, (2.0 / fan_in).sqrt(), rng),
        };
        Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
    }
}
