//! The UCI optical handwritten digits (8×8 images, 1,797 samples), embedded in the binary.
//!
//! Source: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine
//! Learning Repository (1998), CC BY 4.0, as shipped in scikit-learn. `data/digits.bin` holds
//! 1,797 rows of 65 bytes: 64 pixel intensities in 0..=16, then the label.

use super::Dataset;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

const RAW: &[u8] = include_bytes!("../../data/digits.bin");
const ROW: usize = 65;

/// The number of classes in [`digits`].
pub const DIGITS_CLASSES: usize = 10;

/// The digits data set: inputs `[1797, 64]` scaled to `[0, 1]`, integer labels `[1797]` as f32.
///
/// ```
/// let data = kiln::data::digits(&kiln::candle::Device::Cpu)?;
/// assert_eq!(data.len(), 1797);
/// assert_eq!(data.inputs()[0].dims(), &[1797, 64]);
/// # Ok::<(), kiln::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::Data`] if the embedded data were damaged at build time; [`Error::Candle`] if the
/// tensors cannot be made on `device`.
pub fn digits(device: &Device) -> Result<Dataset> {
    if !RAW.len().is_multiple_of(ROW) {
        return Err(Error::Data("the embedded digits data is corrupt".into()));
    }
    let n = RAW.len() / ROW;
    let mut pixels = Vec::with_capacity(n * 64);
    let mut labels = Vec::with_capacity(n);
    for row in RAW.chunks_exact(ROW) {
        pixels.extend(row[..64].iter().map(|&p| p as f32 / 16.0));
        labels.push(row[64] as f32);
    }
    Dataset::new(
        Tensor::from_vec(pixels, (n, 64), device)?,
        Tensor::from_vec(labels, n, device)?,
    )
}
