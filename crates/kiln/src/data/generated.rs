//! Generated data sets with a seed: Gaussian blobs (optionally imbalanced), interleaved
//! spirals, and a noisy linear regression.

use super::Dataset;
use crate::error::{invalid, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Gaussian blobs: `classes` clusters in `features` dimensions, class `c` getting a share of
/// the samples proportional to `imbalance^c` (1 = balanced), integer labels, from a seed.
///
/// ```
/// use kiln::data::Blobs;
/// let cpu = kiln::candle::Device::Cpu;
/// let d = Blobs::new(300).classes(3).features(2).imbalance(0.5).seed(7).generate(&cpu)?;
/// assert_eq!(d.inputs()[0].dims(), &[300, 2]);
/// assert!(Blobs::new(300).imbalance(f64::NAN).generate(&cpu).is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Blobs {
    samples: usize,
    classes: usize,
    features: usize,
    imbalance: f64,
    seed: u64,
}

impl Blobs {
    /// `samples` samples in 2 balanced classes of 2 features, seed 0.
    pub fn new(samples: usize) -> Self {
        Self {
            samples,
            classes: 2,
            features: 2,
            imbalance: 1.0,
            seed: 0,
        }
    }
    /// The number of classes (clusters).
    pub fn classes(mut self, classes: usize) -> Self {
        self.classes = classes;
        self
    }
    /// The number of features (dimensions).
    pub fn features(mut self, features: usize) -> Self {
        self.features = features;
        self
    }
    /// Class `c` gets a share of the samples proportional to `imbalance^c`; in `(0, 1]`, 1 is
    /// balanced.
    pub fn imbalance(mut self, imbalance: f64) -> Self {
        self.imbalance = imbalance;
        self
    }
    /// The seed the points are drawn from.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Draws the data set.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidArgument`] unless `samples >= classes >= 1`, `features >= 1`,
    /// `imbalance` is in `(0, 1]` and `samples × features` can be counted.
    pub fn generate(&self, device: &Device) -> Result<Dataset> {
        blobs(
            self.samples,
            self.classes,
            self.features,
            self.imbalance,
            self.seed,
            device,
        )
    }
}

/// [`Blobs`] from its five numbers (the run file's `[data]` keys).
pub(crate) fn blobs(
    samples: usize,
    classes: usize,
    features: usize,
    imbalance: f64,
    seed: u64,
    device: &Device,
) -> Result<Dataset> {
    if classes == 0
        || features == 0
        || samples < classes
        || !(imbalance > 0.0 && imbalance <= 1.0)
        || samples.checked_mul(features).is_none()
    {
        return Err(invalid(
            "blobs: need samples >= classes >= 1, features >= 1 and imbalance in (0, 1]",
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let centers: Vec<Vec<f64>> = (0..classes)
        .map(|_| (0..features).map(|_| rng.random_range(-5.0..5.0)).collect())
        .collect();
    let shares: Vec<f64> = (0..classes).map(|c| imbalance.powi(c as i32)).collect();
    let total: f64 = shares.iter().sum();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let mut u = rng.random::<f64>() * total;
        let mut class = classes - 1;
        for (c, s) in shares.iter().enumerate() {
            if u < *s {
                class = c;
                break;
            }
            u -= s;
        }
        for center in &centers[class] {
            let z: f64 = rng.sample(StandardNormal);
            xs.push((center + z) as f32);
        }
        ys.push(class as f32);
    }
    Dataset::new(
        Tensor::from_vec(xs, (samples, features), device)?,
        Tensor::from_vec(ys, samples, device)?,
    )
}

/// Interleaved 2-D spirals, one per class, with Gaussian noise, integer labels, from a seed.
///
/// ```
/// use kiln::data::Spirals;
/// let cpu = kiln::candle::Device::Cpu;
/// let d = Spirals::new(200).classes(3).noise(0.05).seed(1).generate(&cpu)?;
/// assert_eq!((d.len(), d.inputs()[0].dims()[1]), (200, 2));
/// assert!(Spirals::new(200).noise(f64::NAN).generate(&cpu).is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Spirals {
    samples: usize,
    classes: usize,
    noise: f64,
    seed: u64,
}

impl Spirals {
    /// `samples` samples on 2 spirals, noise 0.1, seed 0 (the run file's defaults).
    pub fn new(samples: usize) -> Self {
        Self {
            samples,
            classes: 2,
            noise: 0.1,
            seed: 0,
        }
    }
    /// The number of classes (spirals).
    pub fn classes(mut self, classes: usize) -> Self {
        self.classes = classes;
        self
    }
    /// The standard deviation of the Gaussian noise added to each coordinate.
    pub fn noise(mut self, noise: f64) -> Self {
        self.noise = noise;
        self
    }
    /// The seed the points are drawn from.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Draws the data set.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidArgument`] unless `samples >= classes >= 1` and `noise` is finite
    /// and non-negative.
    pub fn generate(&self, device: &Device) -> Result<Dataset> {
        spirals(self.samples, self.classes, self.noise, self.seed, device)
    }
}

/// A noisy linear regression, `y = x·w + b + noise·N(0, 1)` with random `w` and `b` and `x`
/// uniform in `[-1, 1]`; targets of shape `[samples, 1]`, from a seed.
///
/// ```
/// use kiln::data::Regression;
/// let cpu = kiln::candle::Device::Cpu;
/// let d = Regression::new(100).features(4).noise(0.1).seed(3).generate(&cpu)?;
/// assert_eq!(d.targets()[0].dims(), &[100, 1]);
/// assert!(Regression::new(100).noise(-1.0).generate(&cpu).is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Regression {
    samples: usize,
    features: usize,
    noise: f64,
    seed: u64,
}

impl Regression {
    /// `samples` samples of 4 features, noise 0.1, seed 0 (the run file's defaults).
    pub fn new(samples: usize) -> Self {
        Self {
            samples,
            features: 4,
            noise: 0.1,
            seed: 0,
        }
    }
    /// The number of features.
    pub fn features(mut self, features: usize) -> Self {
        self.features = features;
        self
    }
    /// The standard deviation of the Gaussian noise added to each target.
    pub fn noise(mut self, noise: f64) -> Self {
        self.noise = noise;
        self
    }
    /// The seed the data is drawn from.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Draws the data set.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidArgument`] unless there is at least one sample and one feature,
    /// the product can be counted, and `noise` is finite and non-negative.
    pub fn generate(&self, device: &Device) -> Result<Dataset> {
        regression(self.samples, self.features, self.noise, self.seed, device)
    }
}

/// [`Spirals`] from its numbers (the run file's `[data]` keys).
pub(crate) fn spirals(
    samples: usize,
    classes: usize,
    noise: f64,
    seed: u64,
    device: &Device,
) -> Result<Dataset> {
    if classes == 0 || samples < classes || samples.checked_mul(2).is_none() {
        return Err(invalid("spirals: need samples >= classes >= 1"));
    }
    check_noise("spirals", noise)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let class = i % classes;
        let r = rng.random::<f64>();
        let angle = r * 4.0 + class as f64 * 2.0 * std::f64::consts::PI / classes as f64;
        let (nx, ny): (f64, f64) = (rng.sample(StandardNormal), rng.sample(StandardNormal));
        xs.push((r * angle.cos() + noise * nx) as f32);
        xs.push((r * angle.sin() + noise * ny) as f32);
        ys.push(class as f32);
    }
    Dataset::new(
        Tensor::from_vec(xs, (samples, 2), device)?,
        Tensor::from_vec(ys, samples, device)?,
    )
}

/// [`Regression`] from its numbers (the run file's `[data]` keys).
pub(crate) fn regression(
    samples: usize,
    features: usize,
    noise: f64,
    seed: u64,
    device: &Device,
) -> Result<Dataset> {
    if samples == 0 || features == 0 || samples.checked_mul(features).is_none() {
        return Err(invalid(
            "regression: need at least one sample and one feature",
        ));
    }
    check_noise("regression", noise)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let w: Vec<f64> = (0..features).map(|_| rng.random_range(-2.0..2.0)).collect();
    let b: f64 = rng.random_range(-1.0..1.0);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let x: Vec<f64> = (0..features).map(|_| rng.random_range(-1.0..1.0)).collect();
        let z: f64 = rng.sample(StandardNormal);
        ys.push((x.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + b + noise * z) as f32);
        xs.extend(x.iter().map(|&v| v as f32));
    }
    Dataset::new(
        Tensor::from_vec(xs, (samples, features), device)?,
        Tensor::from_vec(ys, (samples, 1), device)?,
    )
}

/// Noise that is NaN, infinite or negative would make every sample NaN or meaningless.
fn check_noise(what: &str, noise: f64) -> Result<()> {
    if noise.is_finite() && noise >= 0.0 {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what}: noise must be a finite standard deviation >= 0, got {noise}"
        )))
    }
}
