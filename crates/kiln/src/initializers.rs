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
    /// A (semi-)orthogonal matrix times `gain`, as Keras' `Orthogonal` (the default recurrent
    /// kernel): the weight is seen as a `[prod(shape[..-1]), shape[-1]]` matrix whose rows (or
    /// columns, whichever are fewer) are orthonormal.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use kiln::Initializer;
    /// use rand::SeedableRng;
    /// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    /// let w = Initializer::Orthogonal { gain: 1.0 }.init(&[3, 12], DType::F64, &Device::Cpu, &mut rng)?;
    /// let gram = w.matmul(&w.t()?)?.to_vec2::<f64>()?; // rows are orthonormal
    /// for i in 0..3 {
    ///     for j in 0..3 {
    ///         assert!((gram[i][j] - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
    ///     }
    /// }
    /// # Ok::<(), kiln::Error>(())
    /// ```
    Orthogonal {
        /// The factor applied to the orthogonal matrix.
        gain: f64,
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

/// A matrix with orthonormal rows or columns: the Q factor of a Gaussian matrix's QR
/// decomposition with a positive diagonal in R (modified Gram-Schmidt gives exactly that factor).
fn orthogonal(shape: &[usize], gain: f64, rng: &mut StdRng) -> Result<Vec<f64>> {
    if shape.len() < 2 {
        return Err(crate::error::invalid(format!(
            "the orthogonal initializer needs a weight of rank >= 2, got shape {shape:?}"
        )));
    }
    let cols = shape[shape.len() - 1];
    let rows: usize = shape[..shape.len() - 1].iter().product();
    // Work on a tall matrix (long x short) and orthonormalize its short side's vectors.
    let (long, short) = (rows.max(cols), rows.min(cols));
    let mut vectors: Vec<Vec<f64>> = (0..short)
        .map(|_| (0..long).map(|_| rng.sample(StandardNormal)).collect())
        .collect();
    for j in 0..short {
        for k in 0..j {
            let (done, rest) = vectors.split_at_mut(j);
            let dot: f64 = done[k].iter().zip(&rest[0]).map(|(a, b)| a * b).sum();
            for (v, q) in rest[0].iter_mut().zip(&done[k]) {
                *v -= dot * q;
            }
        }
        let norm = vectors[j].iter().map(|v| v * v).sum::<f64>().sqrt();
        for v in vectors[j].iter_mut() {
            *v /= norm;
        }
    }
    // vectors[j][i] is Q[i][j] of the tall Q; lay it out as `rows x cols`.
    let mut out = vec![0.0; rows * cols];
    for (j, v) in vectors.iter().enumerate() {
        for (i, &q) in v.iter().enumerate() {
            let (r, c) = if rows >= cols { (i, j) } else { (j, i) };
            out[r * cols + c] = gain * q;
        }
    }
    Ok(out)
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
        let uniform = |limit: f64, rng: &mut StdRng| -> Result<Vec<f64>> {
            let dist = Uniform::new_inclusive(-limit, limit).map_err(|_| {
                crate::error::invalid(format!(
                    "uniform initializer: the limit must be finite and >= 0, got {limit}"
                ))
            })?;
            Ok((0..n).map(|_| dist.sample(rng)).collect())
        };
        let values: Vec<f64> = match self {
            Initializer::Zeros => vec![0.0; n],
            Initializer::Ones => vec![1.0; n],
            Initializer::GlorotUniform => uniform((6.0 / (fan_in + fan_out)).sqrt(), rng)?,
            Initializer::HeUniform => uniform((6.0 / fan_in).sqrt(), rng)?,
            Initializer::RandomUniform { limit } => uniform(limit, rng)?,
            Initializer::GlorotNormal => {
                truncated_normal(n, (2.0 / (fan_in + fan_out)).sqrt(), rng)
            }
            Initializer::HeNormal => truncated_normal(n, (2.0 / fan_in).sqrt(), rng),
            Initializer::Orthogonal { gain } => orthogonal(shape, gain, rng)?,
        };
        Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
    }
}
