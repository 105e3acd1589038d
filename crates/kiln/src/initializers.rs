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
/// use kiln::candle::{DType, Device};
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
    /// use kiln::candle::{DType, Device};
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
        let n = reserve(shape, dtype)?;
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

/// The memory weights may take: the machine's physical memory (`MemTotal` of `/proc/meminfo`
/// on Linux), or 64 GiB where it cannot be read.
///
/// ```
/// assert!(kiln::initializers::memory_limit() > 0);
/// ```
///
/// # Errors
///
/// None: falls back to the constant.
pub fn memory_limit() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                kib.checked_mul(1024)
            })
            .unwrap_or(64 << 30)
    })
}

#[cfg(test)]
thread_local! {
    static LIMIT_OVERRIDE: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

fn effective_limit() -> u64 {
    #[cfg(test)]
    if let Some(l) = LIMIT_OVERRIDE.with(|l| l.get()) {
        return l;
    }
    memory_limit()
}

/// What the weights created so far by the model being built take, and the layer being built.
struct Budget {
    layer: Option<String>,
    used: u64,
}

thread_local! {
    static BUDGET: std::cell::RefCell<Budget> = const {
        std::cell::RefCell::new(Budget { layer: None, used: 0 })
    };
}

/// Starts counting the weights of a model (the model builder calls this before building).
pub(crate) fn begin_model() {
    BUDGET.with(|b| {
        let mut b = b.borrow_mut();
        b.layer = None;
        b.used = 0;
    });
}

/// Names the layer whose weights are created next, for error messages.
pub(crate) fn building_layer(name: Option<&str>) {
    BUDGET.with(|b| b.borrow_mut().layer = name.map(str::to_string));
}

/// The number of elements of a weight of `shape`, checked before anything is allocated: the
/// element count and byte size cannot overflow, and the weight (with the `f64` values it is
/// drawn as, and the weights of the model built so far) must fit in [`memory_limit`].
///
/// ```
/// use kiln::candle::DType;
/// assert_eq!(kiln::initializers::check_weight_size(&[3, 4], DType::F32)?, 12);
/// let err = kiln::initializers::check_weight_size(&[1 << 40, 1 << 30], DType::F32).unwrap_err();
/// assert!(err.to_string().contains("bytes"), "{err}");
/// # Ok::<(), kiln::Error>(())
/// ```
///
/// # Errors
///
/// [`crate::Error::InvalidArgument`] naming the layer (when a model is being built), the shape
/// and the bytes, when the size overflows or exceeds the memory.
pub fn check_weight_size(shape: &[usize], dtype: DType) -> Result<usize> {
    // Earlier weights count only while a model is being built.
    let (layer, used) = BUDGET.with(|b| {
        let b = b.borrow();
        (b.layer.clone(), if b.layer.is_some() { b.used } else { 0 })
    });
    let what = match &layer {
        Some(l) => format!("layer `{l}`: a weight of shape {shape:?}"),
        None => format!("a weight of shape {shape:?}"),
    };
    let limit = effective_limit();
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            crate::error::invalid(format!(
                "{what} has more elements than can be counted (the product of its shape \
                 overflows {} bits), so more bytes than any machine has: use fewer units, \
                 filters or features",
                usize::BITS
            ))
        })?;
    let bytes = (n as u128) * dtype.size_in_bytes() as u128;
    // The values are drawn as f64 first, then converted.
    let peak = bytes + (n as u128) * 8 + used as u128;
    if peak > limit as u128 {
        let so_far = if used > 0 {
            format!(" on top of the {used} bytes of the model's earlier weights")
        } else {
            String::new()
        };
        return Err(crate::error::invalid(format!(
            "{what} needs {bytes} bytes ({n} elements of {dtype:?}), {peak} bytes at peak while \
             its values are drawn{so_far}: more than this machine's {limit} bytes of memory; use \
             fewer units, filters or features"
        )));
    }
    Ok(n)
}

/// Checks a weight's size (see [`check_weight_size`]) and counts it against the model's memory.
fn reserve(shape: &[usize], dtype: DType) -> Result<usize> {
    let n = check_weight_size(shape, dtype)?;
    let bytes = (n as u64).saturating_mul(dtype.size_in_bytes() as u64);
    BUDGET.with(|b| {
        let mut b = b.borrow_mut();
        if b.layer.is_some() {
            b.used = b.used.saturating_add(bytes);
        }
    });
    Ok(n)
}

#[cfg(test)]
mod memory_tests {
    use super::*;
    use crate::graph::Input;
    use crate::layers::{Dense, LayerExt};

    #[test]
    fn the_weights_of_a_whole_model_count_against_the_memory() {
        // 12 kB of "memory": a Dense 30→30 kernel takes 3600 B (10800 B at peak, with its f64
        // draw), so one fits after a Dense 1→30, but a second one on top of the first does not.
        LIMIT_OVERRIDE.with(|l| l.set(Some(12_000)));
        let x = Input::new([1]);
        let h = Dense::new(30).with_name("a").apply(&x).unwrap();
        let one = crate::Model::new(
            std::slice::from_ref(&x),
            &[Dense::new(30).with_name("b").apply(&h).unwrap()],
        );
        assert!(one.is_ok(), "{:?}", one.err());
        // Two layers that fit alone but not together: the second is refused before allocating.
        let h = Dense::new(30).with_name("c").apply(&x).unwrap();
        let h = Dense::new(30).with_name("d").apply(&h).unwrap();
        let y = Dense::new(30).with_name("e").apply(&h).unwrap();
        let err = crate::Model::new(&[x], &[y])
            .expect_err("too big")
            .to_string();
        LIMIT_OVERRIDE.with(|l| l.set(None));
        assert!(err.contains("layer `e`") && err.contains("bytes"), "{err}");
        assert!(err.contains("earlier weights"), "{err}");
    }

    #[test]
    fn overflowing_shapes_are_errors() {
        let err = check_weight_size(&[usize::MAX, 2], DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("overflows"), "{err}");
    }
}
