//! Training data: tensors with one sample per row, batching, splitting, and the built-in
//! digits data set.

mod digits;
mod files;
mod generated;

pub use digits::{digits, DIGITS_CLASSES};
pub use files::{load_csv, load_csv_features, load_idx, load_npy, load_npz, write_predictions};
pub use generated::{blobs, regression, spirals};

/// One-hot encodes integer labels of shape `[n]` (or `[n, 1]`) into `[n, classes]`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let y = Tensor::new(&[2f32, 0.], &Device::Cpu)?;
/// let oh = kiln::data::one_hot(&y, 3)?;
/// assert_eq!(oh.to_vec2::<f32>()?, vec![vec![0., 0., 1.], vec![1., 0., 0.]]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn one_hot(labels: &Tensor, classes: usize) -> Result<Tensor> {
    let flat = labels
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    let mut out = vec![0f32; flat.len() * classes];
    for (i, &l) in flat.iter().enumerate() {
        if l < 0.0 || l as usize >= classes || l.fract() != 0.0 {
            return Err(Error::Data(format!(
                "label {l} at row {i} is not a class index in [0, {classes})"
            )));
        }
        out[i * classes + l as usize] = 1.0;
    }
    Ok(Tensor::from_vec(
        out,
        (flat.len(), classes),
        labels.device(),
    )?)
}

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

/// Inputs, targets and optional per-sample weights, one sample per row (axis 0).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use kiln::Dataset;
/// let x = Tensor::zeros((10, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let y = Tensor::zeros(10, candle_core::DType::F32, &Device::Cpu)?;
/// let data = Dataset::new(x, y)?;
/// let (train, val) = data.split_tail(0.2)?;
/// assert_eq!((train.len(), val.len()), (8, 2));
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Dataset {
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) targets: Vec<Tensor>,
    pub(crate) sample_weight: Option<Tensor>,
}

impl Dataset {
    /// One input and one target.
    pub fn new(x: Tensor, y: Tensor) -> Result<Self> {
        Self::multi(vec![x], vec![y])
    }

    /// Several inputs and targets (in the model's input and output order).
    pub fn multi(inputs: Vec<Tensor>, targets: Vec<Tensor>) -> Result<Self> {
        let data = Self {
            inputs,
            targets,
            sample_weight: None,
        };
        data.check_rows()?;
        Ok(data)
    }

    /// Inputs only, for `predict`.
    pub fn inputs_only(inputs: Vec<Tensor>) -> Result<Self> {
        Self::multi(inputs, Vec::new())
    }

    /// Attaches per-sample weights, shape `[n]` (or `[n, steps]` for sequence outputs).
    pub fn with_sample_weight(mut self, weight: Tensor) -> Result<Self> {
        self.sample_weight = Some(weight);
        self.check_rows()?;
        Ok(self)
    }

    fn check_rows(&self) -> Result<()> {
        let n = self.len();
        let named = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("input {i}"), t))
            .chain(
                self.targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (format!("target {i}"), t)),
            )
            .chain(
                self.sample_weight
                    .iter()
                    .map(|t| ("sample_weight".to_string(), t)),
            );
        for (what, t) in named {
            if t.rank() == 0 || t.dims()[0] != n {
                return Err(Error::Data(format!(
                    "{what} has shape {:?} but the first input has {n} samples: every tensor needs \
                     one row per sample",
                    t.dims()
                )));
            }
        }
        if self.inputs.is_empty() {
            return Err(Error::Data(
                "a dataset needs at least one input tensor".into(),
            ));
        }
        Ok(())
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.inputs.first().map_or(0, |t| t.dims()[0])
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The input tensors.
    pub fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }

    /// The target tensors.
    pub fn targets(&self) -> &[Tensor] {
        &self.targets
    }

    /// The per-sample weights, if any.
    pub fn sample_weight(&self) -> Option<&Tensor> {
        self.sample_weight.as_ref()
    }

    /// The samples at `rows`, in that order.
    pub fn select(&self, rows: &[u32]) -> Result<Dataset> {
        let device = self.inputs[0].device();
        let index = Tensor::from_slice(rows, rows.len(), device)?;
        let pick = |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(&index, 0)?) };
        Ok(Dataset {
            inputs: self.inputs.iter().map(pick).collect::<Result<_>>()?,
            targets: self.targets.iter().map(pick).collect::<Result<_>>()?,
            sample_weight: self.sample_weight.as_ref().map(pick).transpose()?,
        })
    }

    /// Samples `[start, start + len)`.
    pub fn slice(&self, start: usize, len: usize) -> Result<Dataset> {
        let pick = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, start, len)?) };
        Ok(Dataset {
            inputs: self.inputs.iter().map(pick).collect::<Result<_>>()?,
            targets: self.targets.iter().map(pick).collect::<Result<_>>()?,
            sample_weight: self.sample_weight.as_ref().map(pick).transpose()?,
        })
    }

    /// Splits off the last `fraction` of the samples, as Keras' `validation_split` does (before
    /// any shuffling).
    pub fn split_tail(&self, fraction: f64) -> Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(Error::Data(format!(
                "validation split must be in [0, 1), got {fraction}"
            )));
        }
        let n = self.len();
        let tail = (n as f64 * fraction).floor() as usize;
        let head = n - tail;
        if fraction > 0.0 && (tail == 0 || head == 0) {
            return Err(Error::Data(format!(
                "validation split {fraction} of {n} samples leaves an empty part: use more data or \
                 another fraction"
            )));
        }
        Ok((self.slice(0, head)?, self.slice(head, tail)?))
    }

    /// Shuffles the samples with `seed` and splits off the last `fraction` as a held-out set.
    pub fn shuffled_split(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        use rand::{seq::SliceRandom, SeedableRng};
        let mut order: Vec<u32> = (0..self.len() as u32).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        self.select(&order)?.split_tail(fraction)
    }

    /// Moves every tensor to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Dataset> {
        let mv = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?) };
        Ok(Dataset {
            inputs: self.inputs.iter().map(mv).collect::<Result<_>>()?,
            targets: self.targets.iter().map(mv).collect::<Result<_>>()?,
            sample_weight: self.sample_weight.as_ref().map(mv).transpose()?,
        })
    }
}
