//! The per-sample contract of compile-time losses, checked on real batches: one value per
//! sample (the shape), each sample's value from that sample alone (permuting the samples
//! permutes the values), and shape errors inside a loss told in the user's terms.

use crate::error::{ContractProblem, ContractViolation, Error, LossShapeError, Result};
use crate::losses::Loss;
use candle_core::{DType, Tensor};

/// What the checks need to name: the loss and the output it was compiled for.
pub(crate) struct LossSite<'a> {
    pub(crate) loss: &'a dyn Loss,
    pub(crate) output: &'a str,
    pub(crate) y_true: &'a Tensor,
    pub(crate) y_pred: &'a Tensor,
}

impl LossSite<'_> {
    fn violation(&self, problem: ContractProblem, got: &[usize]) -> Error {
        Error::LossContract(Box::new(ContractViolation {
            loss: self.loss.name().to_string(),
            output: self.output.to_string(),
            batch: self.y_pred.dims().first().copied().unwrap_or(0),
            got: got.to_vec(),
            y_true: self.y_true.dims().to_vec(),
            y_pred: self.y_pred.dims().to_vec(),
            problem,
        }))
    }

    /// Checks that `values` (what the loss returned) hold one float per sample.
    pub(crate) fn check_shape(&self, values: &Tensor) -> Result<()> {
        if !values.dtype().is_float() {
            return Err(Error::Compile(format!(
                "loss `{}` for output `{}` returned {:?} values: a loss must return floats (the \
                 dtype of y_pred, {:?}); an integer loss has no gradient",
                self.loss.name(),
                self.output,
                values.dtype(),
                self.y_pred.dtype()
            )));
        }
        let batch = self.y_pred.dims().first().copied().unwrap_or(0);
        let whole_batch = self.loss.whole_batch() && values.rank() == 0;
        if !whole_batch && (values.rank() == 0 || values.dims()[0] != batch) {
            return Err(self.violation(ContractProblem::WrongShape, values.dims()));
        }
        Ok(())
    }

    /// Checks that the loss keeps samples apart: run on the samples in reverse order, it must
    /// return the values in reverse order. A loss that reduces over the batch axis (a mean over
    /// axis 0) passes the shape check whenever a feature count equals the batch size, but not
    /// this one. Needs two samples or more; a whole-batch loss (a scalar) is exempt.
    pub(crate) fn check_samples_apart(&self, values: &Tensor) -> Result<()> {
        let batch = self.y_pred.dims().first().copied().unwrap_or(0);
        if batch < 2 || values.rank() == 0 {
            return Ok(());
        }
        let device = self.y_pred.device();
        let order: Vec<u32> = (0..batch as u32).rev().collect();
        let reverse = Tensor::from_vec(order, batch, device)?;
        let flip = |t: &Tensor| -> Result<Tensor> {
            Ok(t.detach().contiguous()?.index_select(&reverse, 0)?)
        };
        let (y_true, y_pred) = (flip(self.y_true)?, flip(self.y_pred)?);
        let permuted = self.loss.per_sample(&y_true, &y_pred)?;
        if permuted.dims() != values.dims() {
            return Err(self.violation(ContractProblem::MixesSamples, values.dims()));
        }
        let expected = flip(values)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let got = permuted
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let scale = expected.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let apart = expected
            .iter()
            .zip(&got)
            .all(|(e, g)| (e - g).abs() <= 1e-4 * scale || (e.is_nan() && g.is_nan()));
        match apart {
            true => Ok(()),
            false => Err(self.violation(ContractProblem::MixesSamples, values.dims())),
        }
    }

    /// A candle error raised inside the loss, told as what the user can change: the shapes of
    /// the targets and of the output when they differ, the candle message otherwise.
    pub(crate) fn explain(&self, e: Error) -> Error {
        let Error::Candle(c) = e else {
            return e;
        };
        let (t, p) = (self.y_true.dims(), self.y_pred.dims());
        let hint = match (t, p) {
            ([_, tc], [_, pc]) if tc != pc => format!(
                ": the targets have {tc} column{} but output `{}` has {pc} unit{}; give targets \
                 with {pc} column{} or give the output layer {tc} units",
                plural(*tc),
                self.output,
                plural(*pc),
                plural(*pc),
            ),
            (t, p) if t.len() != p.len() => format!(
                ": the targets have {} axes but output `{}` has {}; reshape the targets to {p:?} \
                 or use a loss for these shapes",
                t.len(),
                self.output,
                p.len()
            ),
            (t, p) if t != p => format!(
                ": the targets' samples have shape {:?} but output `{}` gives {:?}",
                &t[1.min(t.len())..],
                self.output,
                &p[1.min(p.len())..]
            ),
            _ => String::new(),
        };
        Error::LossShape(Box::new(LossShapeError {
            loss: self.loss.name().to_string(),
            output: self.output.to_string(),
            y_true: t.to_vec(),
            y_pred: p.to_vec(),
            hint,
            detail: candle_message(&c),
        }))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// candle's message on one line (its shape errors end with the op name).
fn candle_message(c: &candle_core::Error) -> String {
    c.to_string().lines().next().unwrap_or_default().to_string()
}
