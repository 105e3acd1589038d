//! Training data: tensors with one sample per row, batching, splitting, and the built-in
//! digits data set.

mod digits;
mod files;
mod generated;
mod npy;
#[cfg(test)]
mod tests;

pub use digits::{digits, DIGITS_CLASSES};
pub use files::{
    csv_columns, load_csv, load_csv_features, load_csv_features_with, load_csv_with, load_idx,
    load_idx_with, load_npy, load_npy_with, load_npz, load_npz_with, write_predictions,
    ReadOptions, DEFAULT_MAX_BYTES,
};
pub(crate) use generated::{blobs, regression, spirals};
pub use generated::{Blobs, Regression, Spirals};

/// One-hot encodes integer labels of shape `[n]` (or `[n, 1]`) into `[n, classes]`.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// let y = Tensor::new(&[2f32, 0.], &Device::Cpu)?;
/// let oh = kiln::data::one_hot(&y, 3)?;
/// assert_eq!(oh.to_vec2::<f32>()?, vec![vec![0., 0., 1.], vec![1., 0., 0.]]);
/// # Ok::<(), kiln::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::Data`] if a label is not an integer in `[0, classes)` (NaN included) or the result
/// would be too large to allocate; [`Error::Candle`] if the labels cannot be read as f32.
pub fn one_hot(labels: &Tensor, classes: usize) -> Result<Tensor> {
    let flat = labels
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    let size = flat.len().checked_mul(classes).ok_or_else(|| {
        Error::Data(format!(
            "{} labels × {classes} classes is too large a one-hot tensor",
            flat.len()
        ))
    })?;
    let mut out = vec![0f32; size];
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
/// use kiln::candle::{Device, Tensor};
/// use kiln::Dataset;
/// let x = Tensor::zeros((10, 3), kiln::candle::DType::F32, &Device::Cpu)?;
/// let y = Tensor::zeros(10, kiln::candle::DType::F32, &Device::Cpu)?;
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
    /// One weight (or none) per target, when given per output; empty otherwise.
    pub(crate) output_weights: Vec<Option<Tensor>>,
}

fn both_weight_forms() -> Error {
    Error::Data(
        "a data set takes one sample weight for every output (with_sample_weight) or one per \
         output (with_output_sample_weights), not both: put the shared weight in every output's \
         entry"
            .into(),
    )
}

/// The rows of `t` (its first axis), or an error naming `what` for a 0-d tensor.
fn rows_of(what: &str, t: &Tensor) -> Result<usize> {
    t.dims().first().copied().ok_or_else(|| {
        Error::Data(format!(
            "{what} is 0-d (a scalar): a data set needs one row per sample (axis 0); give it at \
             least one axis"
        ))
    })
}

impl Dataset {
    /// One input and one target.
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
    /// let y = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
    /// assert_eq!(kiln::Dataset::new(x.clone(), y)?.len(), 4);
    /// let scalar = Tensor::new(1f32, &Device::Cpu)?;
    /// assert!(kiln::Dataset::new(x, scalar).is_err()); // 0-d: no rows
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Data`] if either tensor is 0-d or their first axes (the samples) differ.
    pub fn new(x: Tensor, y: Tensor) -> Result<Self> {
        Self::multi(vec![x], vec![y])
    }

    /// Several inputs and targets (in the model's input and output order).
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// let a = Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?;
    /// let b = Tensor::zeros((3, 5, 5), DType::F32, &Device::Cpu)?;
    /// let y = Tensor::zeros(3, DType::U32, &Device::Cpu)?;
    /// assert_eq!(kiln::Dataset::multi(vec![a, b], vec![y])?.inputs().len(), 2);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Data`] if there is no input, a tensor is 0-d, or the tensors' first axes differ.
    pub fn multi(inputs: Vec<Tensor>, targets: Vec<Tensor>) -> Result<Self> {
        let data = Self {
            inputs,
            targets,
            sample_weight: None,
            output_weights: Vec::new(),
        };
        data.check_rows()?;
        Ok(data)
    }

    /// Inputs only, for `predict`.
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// let x = Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?;
    /// assert!(kiln::Dataset::inputs_only(vec![x])?.targets().is_empty());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Dataset::multi`].
    pub fn inputs_only(inputs: Vec<Tensor>) -> Result<Self> {
        Self::multi(inputs, Vec::new())
    }

    /// Attaches per-sample weights, shape `[n]` (or `[n, steps]` for sequence outputs).
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// let x = Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?;
    /// let y = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
    /// let w = Tensor::ones(3, DType::F32, &Device::Cpu)?;
    /// let data = kiln::Dataset::new(x, y)?.with_sample_weight(w)?;
    /// assert!(data.sample_weight().is_some());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Data`] if the weights are 0-d or have another number of rows.
    pub fn with_sample_weight(mut self, weight: Tensor) -> Result<Self> {
        if !self.output_weights.is_empty() {
            return Err(both_weight_forms());
        }
        self.sample_weight = Some(weight);
        self.check_rows()?;
        Ok(self)
    }

    /// Attaches sample weights per output, one entry per target in output order (`None`: that
    /// output's samples all weigh 1), as Keras' `fit(sample_weight={"label": w})` or its list
    /// form. Each weight reaches its output's loss and weighted metrics only.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?;
    /// let (value, label) = (x.narrow(1, 0, 1)?, x.narrow(1, 1, 1)?);
    /// let w = Tensor::new(&[1f32, 2., 1.], &Device::Cpu)?;
    /// let data = Dataset::multi(vec![x], vec![value, label])?.with_output_sample_weights(vec![None, Some(w)])?;
    /// assert!(data.sample_weight_for(0).is_none());
    /// assert_eq!(data.sample_weight_for(1).unwrap().to_vec1::<f32>()?, [1.0, 2.0, 1.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Data`] if there is not one entry per target, a weight is 0-d or has another
    /// number of rows, or the data set already has one sample weight for every output.
    pub fn with_output_sample_weights(mut self, weights: Vec<Option<Tensor>>) -> Result<Self> {
        if self.sample_weight.is_some() {
            return Err(both_weight_forms());
        }
        if weights.len() != self.targets.len() {
            return Err(Error::Data(format!(
                "with_output_sample_weights got {} entries for {} targets: give one per target, \
                 in output order (None for an output without weights)",
                weights.len(),
                self.targets.len()
            )));
        }
        self.output_weights = weights;
        self.check_rows()?;
        Ok(self)
    }

    /// The sample weights that reach output `output`'s loss: its own
    /// ([`Dataset::with_output_sample_weights`]) or the one for every output
    /// ([`Dataset::with_sample_weight`]), if any.
    pub fn sample_weight_for(&self, output: usize) -> Option<&Tensor> {
        match self.output_weights.is_empty() {
            true => self.sample_weight.as_ref(),
            false => self.output_weights.get(output).and_then(Option::as_ref),
        }
    }

    /// Whether sample weights were given per output.
    pub(crate) fn has_output_weights(&self) -> bool {
        self.output_weights.iter().any(Option::is_some)
    }

    fn check_rows(&self) -> Result<()> {
        let first = self
            .inputs
            .first()
            .ok_or_else(|| Error::Data("a dataset needs at least one input tensor".into()))?;
        let n = rows_of("input 0", first)?;
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
            )
            .chain(self.output_weights.iter().enumerate().filter_map(|(i, t)| {
                t.as_ref()
                    .map(|t| (format!("the sample weight of output {i}"), t))
            }));
        for (what, t) in named {
            if rows_of(&what, t)? != n {
                return Err(Error::Data(format!(
                    "{what} has shape {:?} but the first input has {n} samples: every tensor needs \
                     one row per sample",
                    t.dims()
                )));
            }
        }
        Ok(())
    }

    /// The number of samples (0 for a data set without inputs).
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// let x = Tensor::zeros((0, 2), DType::F32, &Device::Cpu)?;
    /// let data = kiln::Dataset::inputs_only(vec![x])?;
    /// assert_eq!(data.len(), 0);
    /// assert!(data.is_empty());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.inputs
            .first()
            .and_then(|t| t.dims().first().copied())
            .unwrap_or(0)
    }

    /// Whether there are no samples.
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// let x = Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?;
    /// assert!(!kiln::Dataset::inputs_only(vec![x])?.is_empty());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The input tensors.
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
    /// assert_eq!(kiln::Dataset::inputs_only(vec![x])?.inputs()[0].dims(), &[2, 3]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }

    /// The target tensors.
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
    /// let y = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
    /// assert_eq!(kiln::Dataset::new(x, y)?.targets()[0].dims(), &[2]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn targets(&self) -> &[Tensor] {
        &self.targets
    }

    /// The per-sample weights for every output, if any (see also
    /// [`Dataset::sample_weight_for`]).
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
    /// assert!(kiln::Dataset::inputs_only(vec![x])?.sample_weight().is_none());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn sample_weight(&self) -> Option<&Tensor> {
        self.sample_weight.as_ref()
    }

    /// Applies `f` to every tensor.
    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Dataset> {
        Ok(Dataset {
            inputs: self.inputs.iter().map(&f).collect::<Result<_>>()?,
            targets: self.targets.iter().map(&f).collect::<Result<_>>()?,
            sample_weight: self.sample_weight.as_ref().map(&f).transpose()?,
            output_weights: self
                .output_weights
                .iter()
                .map(|w| w.as_ref().map(&f).transpose())
                .collect::<Result<_>>()?,
        })
    }

    /// The samples at `rows`, in that order (a row may repeat). Works on tensors of any layout
    /// (views such as `narrow` or `t()` are made contiguous first).
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// let x = Tensor::new(&[[0f32, 1.], [2., 3.], [4., 5.]], &Device::Cpu)?;
    /// let data = kiln::Dataset::inputs_only(vec![x.t()?])?; // a transposed view: 2 rows
    /// let picked = data.select(&[1, 0, 1])?;
    /// assert_eq!(picked.inputs()[0].to_vec2::<f32>()?, vec![vec![1., 3., 5.], vec![0., 2., 4.], vec![1., 3., 5.]]);
    /// assert!(data.select(&[2]).is_err()); // out of range
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Data`] if a row is out of range; [`Error::Candle`] if a tensor operation fails.
    pub fn select(&self, rows: &[u32]) -> Result<Dataset> {
        let n = self.len();
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(Error::Data(format!(
                "row {bad} is out of range: the data set has {n} samples"
            )));
        }
        let Some(first) = self.inputs.first() else {
            return Err(Error::Data(
                "a dataset needs at least one input tensor".into(),
            ));
        };
        let index = Tensor::from_slice(rows, rows.len(), first.device())?;
        self.map(|t| {
            if t.elem_count() == 0 {
                // Nothing to copy; candle's index_select would slice an empty buffer at the
                // view's offset.
                let mut dims = t.dims().to_vec();
                dims[0] = rows.len();
                return Ok(Tensor::zeros(dims, t.dtype(), t.device())?);
            }
            let index = index.to_device(t.device())?;
            Ok(t.contiguous()?.index_select(&index, 0)?)
        })
    }

    /// Samples `[start, start + len)`.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)?;
    /// let data = kiln::Dataset::inputs_only(vec![x])?;
    /// assert_eq!(data.slice(1, 2)?.inputs()[0].to_vec1::<f32>()?, vec![2., 3.]);
    /// assert!(data.slice(3, 2).is_err());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Data`] if the range reaches past the last sample.
    pub fn slice(&self, start: usize, len: usize) -> Result<Dataset> {
        let n = self.len();
        if start.checked_add(len).is_none_or(|end| end > n) {
            return Err(Error::Data(format!(
                "samples {start}..{start}+{len} are out of range: the data set has {n} samples"
            )));
        }
        self.map(|t| Ok(t.narrow(0, start, len)?))
    }

    /// Splits off the last `fraction` of the samples, as Keras' `validation_split` does (before
    /// any shuffling).
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// let x = Tensor::new(&[1f32, 2., 3., 4., 5.], &Device::Cpu)?;
    /// let data = kiln::Dataset::inputs_only(vec![x])?;
    /// let (train, val) = data.split_tail(0.4)?;
    /// assert_eq!(val.inputs()[0].to_vec1::<f32>()?, vec![4., 5.]);
    /// assert_eq!(train.len(), 3);
    /// assert!(data.split_tail(f64::NAN).is_err());
    /// assert!(data.split_tail(1.0).is_err());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Data`] if `fraction` is not in `[0, 1)` (NaN included), or is positive but leaves
    /// one of the parts empty.
    pub fn split_tail(&self, fraction: f64) -> Result<(Dataset, Dataset)> {
        check_fraction(fraction)?;
        let n = self.len();
        let tail = ((n as f64 * fraction).floor() as usize).min(n);
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
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)?;
    /// let data = kiln::Dataset::inputs_only(vec![x])?;
    /// let (train, held_out) = data.shuffled_split(0.25, 7)?;
    /// assert_eq!((train.len(), held_out.len()), (3, 1));
    /// assert!(data.shuffled_split(-0.1, 7).is_err());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Dataset::split_tail`]; also [`Error::Data`] for more than `u32::MAX` samples.
    pub fn shuffled_split(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        use rand::{seq::SliceRandom, SeedableRng};
        check_fraction(fraction)?;
        let n = u32::try_from(self.len()).map_err(|_| {
            Error::Data(format!(
                "{} samples are too many to shuffle (at most {})",
                self.len(),
                u32::MAX
            ))
        })?;
        let mut order: Vec<u32> = (0..n).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        self.select(&order)?.split_tail(fraction)
    }

    /// Moves every tensor to `device`.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// let x = Tensor::new(&[1f32, 2.], &Device::Cpu)?;
    /// let data = kiln::Dataset::inputs_only(vec![x])?.to_device(&Device::Cpu)?;
    /// assert_eq!(data.len(), 2);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Candle`] if a tensor cannot be copied to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Dataset> {
        self.map(|t| Ok(t.to_device(device)?))
    }
}

fn check_fraction(fraction: f64) -> Result<()> {
    if (0.0..1.0).contains(&fraction) {
        Ok(())
    } else {
        Err(Error::Data(format!(
            "validation split must be in [0, 1), got {fraction}"
        )))
    }
}
