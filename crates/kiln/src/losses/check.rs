//! `kiln check-loss`: a loss checked against what training relies on, before it is trusted
//! with a model: the per-sample contract on several shapes and batch sizes, its gradient
//! against finite differences in f64, finite values and gradients at the edges of its domain,
//! and its reductions with sample weights and masks against Keras 3's formulas.

use super::{Loss, LossSpec};
use crate::error::Result;
use crate::model::contract::LossSite;
use crate::reduction::Reduction;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt;
use std::sync::Arc;

/// The inputs a loss is defined on, which the checks draw `y_true` and `y_pred` from.
///
/// ```
/// use kiln::losses::Domain;
/// assert_eq!(Domain::of("sparse_categorical_crossentropy"), Domain::Sparse);
/// assert_eq!(Domain::of("my_custom_loss"), Domain::Real);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// Real targets and predictions of one shape (`[batch, 3]`, `[batch, 2, 3]`): regression.
    Real,
    /// Positive targets and predictions (percentage, logarithmic and Poisson losses).
    Positive,
    /// 0/1 targets and probabilities (binary crossentropies, hinge losses).
    Binary,
    /// One-hot targets and probability rows over 4 classes (categorical losses, divergences,
    /// segmentation overlaps).
    Categorical,
    /// Class indices `[batch]` (or `[batch, 2]`) and probability rows over 4 classes (sparse
    /// crossentropy, generalized crossentropy).
    Sparse,
    /// Label sequences (classes 1..4, 0 = padding) and logits `[batch, steps, 5]` (CTC).
    Sequence,
    /// Class labels `[batch]` and unit embeddings `[batch, 4]`: a pairwise loss, whose values
    /// depend on the other samples by design (Circle).
    Embeddings,
}

impl Domain {
    /// The domain of a built-in loss by its name; [`Domain::Real`] for any other name.
    pub fn of(name: &str) -> Domain {
        match name {
            "mean_absolute_percentage_error" | "mean_squared_logarithmic_error" | "poisson" => {
                Domain::Positive
            }
            "binary_crossentropy" | "binary_focal_crossentropy" | "hinge" | "squared_hinge" => {
                Domain::Binary
            }
            "categorical_crossentropy"
            | "categorical_focal_crossentropy"
            | "categorical_hinge"
            | "kl_divergence"
            | "dice"
            | "tversky" => Domain::Categorical,
            "sparse_categorical_crossentropy" | "categorical_generalized_cross_entropy" => {
                Domain::Sparse
            }
            "ctc" => Domain::Sequence,
            "circle" => Domain::Embeddings,
            _ => Domain::Real,
        }
    }
}

/// One check on one case, and what went wrong (`None`: it passed).
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// `contract`, `gradient`, `finite` or `reduction`.
    pub check: &'static str,
    /// The case: batch size, shapes, probe or reduction.
    pub case: String,
    /// What failed and where, when it failed.
    pub problem: Option<String>,
}

/// What [`check`] found: every case of every check, passed or failed.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The loss's name.
    pub loss: String,
    /// The inputs it was checked on.
    pub domain: Domain,
    /// Every case, in the order run.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// Whether every case passed.
    pub fn passed(&self) -> bool {
        self.findings.iter().all(|f| f.problem.is_none())
    }
    /// The cases that failed.
    pub fn failures(&self) -> Vec<&Finding> {
        self.findings
            .iter()
            .filter(|f| f.problem.is_some())
            .collect()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "loss `{}` on {:?} inputs", self.loss, self.domain)?;
        for check in ["contract", "gradient", "finite", "reduction"] {
            let cases: Vec<&Finding> = self.findings.iter().filter(|x| x.check == check).collect();
            let failed: Vec<&&Finding> = cases.iter().filter(|x| x.problem.is_some()).collect();
            let verdict = if failed.is_empty() { "ok  " } else { "FAIL" };
            writeln!(
                f,
                "{verdict} {check:<9} {} of {} cases passed",
                cases.len() - failed.len(),
                cases.len()
            )?;
            for x in failed {
                writeln!(
                    f,
                    "       {}: {}",
                    x.case,
                    x.problem.as_deref().unwrap_or("")
                )?;
            }
        }
        match self.passed() {
            true => write!(f, "passed"),
            false => write!(f, "FAILED: {} case(s)", self.failures().len()),
        }
    }
}

/// Checks a loss (a built-in or registered name, or a loss value) on the inputs of its
/// [`Domain`] (by its name; [`check_in`] chooses it).
///
/// ```
/// let report = kiln::losses::check("mse")?;
/// assert!(report.passed(), "{report}");
/// # Ok::<(), kiln::Error>(())
/// ```
///
/// # Errors
/// [`crate::Error::InvalidArgument`] for a name that is neither built in nor registered. What
/// the loss itself gets wrong is in the report, not an error.
pub fn check(loss: impl Into<LossSpec>) -> Result<CheckReport> {
    let loss = loss.into().resolve()?;
    let domain = Domain::of(loss.name());
    check_in(loss, domain)
}

/// [`check`] on the inputs of `domain`.
///
/// ```
/// use kiln::candle::{Tensor, D};
/// use kiln::losses::{check_in, loss_fn, Domain};
/// // A binary crossentropy without Keras' clipping: infinite at p = 0 and p = 1.
/// let unclipped = loss_fn("unclipped", |t: &Tensor, p: &Tensor| {
///     let (t, p) = (t.to_dtype(p.dtype())?, p.clone());
///     let ln = (t.mul(&p.log()?)? + (t.affine(-1.0, 1.0)?.mul(&p.affine(-1.0, 1.0)?.log()?))?)?;
///     Ok(ln.neg()?.mean(D::Minus1)?)
/// });
/// let report = check_in(std::sync::Arc::new(unclipped), Domain::Binary)?;
/// assert!(!report.passed());
/// assert!(report.failures().iter().all(|f| f.check == "finite"), "{report}");
/// # Ok::<(), kiln::Error>(())
/// ```
///
/// # Errors
/// None from the loss (its failures are in the report); a tensor error when the inputs cannot
/// be made.
pub fn check_in(loss: Arc<dyn Loss>, domain: Domain) -> Result<CheckReport> {
    let mut report = CheckReport {
        loss: loss.name().to_string(),
        domain,
        findings: Vec::new(),
    };
    let loss = loss.as_ref();
    let mut rng = StdRng::seed_from_u64(17);
    for case in 0..2 {
        for batch in [1, 2, 5, 16] {
            let (t, p) = inputs(domain, case, batch, &mut rng)?;
            let problem = contract(loss, domain, &t, &p).err();
            report
                .findings
                .push(finding("contract", shapes(&t, &p), problem));
        }
    }
    for case in 0..2 {
        let (t, p) = inputs(domain, case, 3, &mut rng)?;
        let problem = gradient(loss, &t, &p).err();
        report
            .findings
            .push(finding("gradient", shapes(&t, &p), problem));
    }
    for (name, t, p) in probes(domain, &mut rng)? {
        let problem = finite(loss, &t, &p).err();
        report.findings.push(finding("finite", name, problem));
    }
    for case in 0..2 {
        let (t, p) = inputs(domain, case, 5, &mut rng)?;
        for (name, problem) in reductions(loss, &t, &p) {
            let case = format!("{name}, {}", shapes(&t, &p));
            report
                .findings
                .push(finding("reduction", case, problem.err()));
        }
    }
    Ok(report)
}

fn finding(check: &'static str, case: String, problem: Option<String>) -> Finding {
    Finding {
        check,
        case,
        problem,
    }
}

fn shapes(t: &Tensor, p: &Tensor) -> String {
    format!(
        "batch {}, y_true {:?}, y_pred {:?}",
        p.dims()[0],
        t.dims(),
        p.dims()
    )
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn tensor(values: Vec<f64>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Rows of probabilities over the last axis of `shape` (a softmax of uniform logits).
fn probabilities(shape: &[usize], rng: &mut StdRng) -> Result<Tensor> {
    let n = shape.iter().product();
    let logits = tensor((0..n).map(|_| rng.random_range(-2.0..2.0)).collect(), shape)?;
    softmax(&logits)
}

/// A softmax over the last axis, from tensor operations (kiln's fused one is for training).
fn softmax(x: &Tensor) -> Result<Tensor> {
    let last = x.rank() - 1;
    let e = x.broadcast_sub(&x.max_keepdim(last)?)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(last)?)?)
}

fn one_hot(classes: &[usize], k: usize, shape: &[usize]) -> Result<Tensor> {
    let mut v = vec![0.0; classes.len() * k];
    for (i, c) in classes.iter().enumerate() {
        v[i * k + c] = 1.0;
    }
    tensor(v, shape)
}

/// `(y_true, y_pred)` of case 0 or 1 of `domain`, `batch` samples, in f64.
fn inputs(domain: Domain, case: usize, batch: usize, rng: &mut StdRng) -> Result<(Tensor, Tensor)> {
    let b = batch;
    let uniform = |shape: &[usize], lo: f64, hi: f64, rng: &mut StdRng| {
        let n = shape.iter().product();
        tensor((0..n).map(|_| rng.random_range(lo..hi)).collect(), shape)
    };
    let sample: &[usize] = if case == 0 { &[3] } else { &[2, 3] };
    let full: Vec<usize> = std::iter::once(b).chain(sample.iter().copied()).collect();
    Ok(match domain {
        Domain::Real => (
            uniform(&full, -1.0, 1.0, rng)?,
            uniform(&full, -1.0, 1.0, rng)?,
        ),
        Domain::Positive => (
            uniform(&full, 0.2, 2.0, rng)?,
            uniform(&full, 0.2, 2.0, rng)?,
        ),
        Domain::Binary => {
            let n = full.iter().product();
            let t = (0..n)
                .map(|_| f64::from(u8::from(rng.random_bool(0.5))))
                .collect();
            (tensor(t, &full)?, uniform(&full, 0.05, 0.95, rng)?)
        }
        Domain::Categorical | Domain::Sparse => {
            let rows: Vec<usize> = if case == 0 { vec![b] } else { vec![b, 2] };
            let n: usize = rows.iter().product();
            let classes: Vec<usize> = (0..n).map(|_| rng.random_range(0..4)).collect();
            let shape: Vec<usize> = rows.iter().copied().chain([4]).collect();
            let t = match domain {
                Domain::Sparse => tensor(classes.iter().map(|&c| c as f64).collect(), &rows)?,
                _ => one_hot(&classes, 4, &shape)?,
            };
            (t, probabilities(&shape, rng)?)
        }
        Domain::Sequence => {
            let (labels, steps) = if case == 0 { (2, 6) } else { (3, 8) };
            let mut t = Vec::new();
            for _ in 0..b {
                let length = rng.random_range(1..=labels);
                for j in 0..labels {
                    t.push(if j < length {
                        rng.random_range(1..5) as f64
                    } else {
                        0.0
                    });
                }
            }
            (
                tensor(t, &[b, labels])?,
                uniform(&[b, steps, 5], -1.0, 1.0, rng)?,
            )
        }
        Domain::Embeddings => {
            let dim = if case == 0 { 4 } else { 6 };
            let t = (0..b).map(|_| rng.random_range(0..2) as f64).collect();
            let e = uniform(&[b, dim], -1.0, 1.0, rng)?;
            let e = e.broadcast_div(&e.sqr()?.sum_keepdim(1)?.sqrt()?)?;
            (tensor(t, &[b])?, e)
        }
    })
}

fn site<'a>(loss: &'a dyn Loss, t: &'a Tensor, p: &'a Tensor) -> LossSite<'a> {
    LossSite {
        loss,
        output: "check",
        y_true: t,
        y_pred: p,
    }
}

/// One value per sample, in the order of the samples, and (but for pairwise losses) each from
/// its own sample alone: changing sample 0 changes no other sample's value.
fn contract(
    loss: &dyn Loss,
    domain: Domain,
    t: &Tensor,
    p: &Tensor,
) -> std::result::Result<(), String> {
    let site = site(loss, t, p);
    let values = loss
        .per_sample(t, p)
        .map_err(|e| site.explain(e).to_string())?;
    site.check_shape(&values).map_err(|e| e.to_string())?;
    site.check_samples_apart(&values)
        .map_err(|e| e.to_string())?;
    let batch = p.dims()[0];
    if batch < 2 || values.rank() == 0 || domain == Domain::Embeddings {
        return Ok(());
    }
    // Sample 0 takes sample 1's inputs.
    let order: Vec<u32> = std::iter::once(1).chain(1..batch as u32).collect();
    let order = Tensor::from_vec(order, batch, p.device()).map_err(|e| e.to_string())?;
    let swap = |x: &Tensor| x.index_select(&order, 0).map_err(|e| e.to_string());
    let changed = loss
        .per_sample(&swap(t)?, &swap(p)?)
        .map_err(|e| e.to_string())?;
    let (a, b) = (
        f64s(&values).map_err(|e| e.to_string())?,
        f64s(&changed).map_err(|e| e.to_string())?,
    );
    let per = a.len() / batch;
    for i in per..a.len() {
        if (a[i] - b[i]).abs() > 1e-9 * (1.0 + a[i].abs()) {
            return Err(format!(
                "the value of sample {} changed from {} to {} when only sample 0's inputs changed: \
                 the loss mixes samples (compute each sample's value from its own row)",
                i / per,
                a[i],
                b[i]
            ));
        }
    }
    Ok(())
}

/// The gradient of Σ per-sample values with respect to `y_pred` against central differences.
fn gradient(loss: &dyn Loss, t: &Tensor, p: &Tensor) -> std::result::Result<(), String> {
    let run = || -> Result<std::result::Result<(), String>> {
        let var = Var::from_tensor(p)?;
        let total = loss.per_sample(t, var.as_tensor())?.sum_all()?;
        let grads = total.backward()?;
        let Some(g) = grads.get(var.as_tensor()) else {
            return Ok(Err(
                "no gradient reaches y_pred: a step that is not differentiable (a \
                           comparison, a cast to integers) or a detached tensor"
                    .into(),
            ));
        };
        let g = f64s(g)?;
        let x = f64s(p)?;
        let value = |x: &[f64]| -> Result<f64> {
            let p = tensor(x.to_vec(), p.dims())?;
            Ok(loss.per_sample(t, &p)?.sum_all()?.to_scalar::<f64>()?)
        };
        let mut worst: Option<(usize, f64, f64)> = None;
        for i in 0..x.len() {
            let h = 1e-6 * x[i].abs().max(1.0);
            let mut up = x.clone();
            up[i] += h;
            let mut down = x.clone();
            down[i] -= h;
            let fd = (value(&up)? - value(&down)?) / (2.0 * h);
            let error = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1.0);
            let bad = error.is_nan() || error > 1e-5;
            if bad && worst.is_none_or(|(_, e, _)| error > e || e.is_nan()) {
                worst = Some((i, error, fd));
            }
        }
        Ok(match worst {
            None => Ok(()),
            Some((i, _, fd)) => Err(format!(
                "d(Σ values)/d y_pred at flat index {i} (of shape {:?}): backward gives {}, \
                 finite differences {fd}",
                p.dims(),
                g[i]
            )),
        })
    };
    run().unwrap_or_else(|e| Err(format!("the loss failed in f64: {e}")))
}

/// The edges of each domain: probabilities 0 and 1, logits ±100, zeros.
fn probes(domain: Domain, rng: &mut StdRng) -> Result<Vec<(String, Tensor, Tensor)>> {
    let (t, p) = inputs(domain, 0, 3, rng)?;
    let filled = |v: f64| -> Result<Tensor> { Ok((p.zeros_like()? + v)?) };
    let mut out = Vec::new();
    match domain {
        Domain::Real => {
            out.push(("zeros".to_string(), t.zeros_like()?, p.zeros_like()?));
            out.push(("y_pred = 100".into(), t.clone(), filled(100.0)?));
            out.push(("y_pred = -100".into(), t.clone(), filled(-100.0)?));
        }
        Domain::Positive => {
            out.push(("y_pred = 0".into(), t.clone(), filled(0.0)?));
            out.push(("y_pred = 100".into(), t.clone(), filled(100.0)?));
        }
        Domain::Binary => {
            out.push(("probabilities 0".into(), t.clone(), filled(0.0)?));
            out.push(("probabilities 1".into(), t.clone(), filled(1.0)?));
        }
        Domain::Categorical | Domain::Sparse => {
            // Every row certain: of the right class, then of a wrong one (probabilities 0 and 1).
            let classes: Vec<usize> = match domain {
                Domain::Sparse => f64s(&t)?.iter().map(|&c| c as usize).collect(),
                _ => t
                    .argmax(1)?
                    .to_vec1::<u32>()?
                    .iter()
                    .map(|&c| c as usize)
                    .collect(),
            };
            let wrong: Vec<usize> = classes.iter().map(|c| (c + 1) % 4).collect();
            out.push((
                "probabilities 0 and 1, right class".into(),
                t.clone(),
                one_hot(&classes, 4, p.dims())?,
            ));
            out.push((
                "probabilities 0 and 1, wrong class".into(),
                t.clone(),
                one_hot(&wrong, 4, p.dims())?,
            ));
        }
        Domain::Sequence => {
            out.push(("logits 0".into(), t.clone(), filled(0.0)?));
            let n = p.elem_count();
            let spread = (0..n)
                .map(|i| if i % 3 == 0 { 100.0 } else { -100.0 })
                .collect();
            out.push(("logits ±100".into(), t.clone(), tensor(spread, p.dims())?));
        }
        Domain::Embeddings => {
            out.push(("embeddings 0".into(), t.clone(), filled(0.0)?));
            let same = (p.zeros_like()? + 0.5)?;
            out.push(("identical embeddings".into(), t.clone(), same));
        }
    }
    Ok(out)
}

/// Finite values and a finite gradient with respect to `y_pred`.
fn finite(loss: &dyn Loss, t: &Tensor, p: &Tensor) -> std::result::Result<(), String> {
    let run = || -> Result<std::result::Result<(), String>> {
        let var = Var::from_tensor(p)?;
        let values = loss.per_sample(t, var.as_tensor())?;
        let v = f64s(&values)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Ok(Err(format!(
                "value {} at flat index {i} (values of shape {:?})",
                v[i],
                values.dims()
            )));
        }
        let grads = values.sum_all()?.backward()?;
        if let Some(g) = grads.get(var.as_tensor()) {
            let g = f64s(g)?;
            if let Some(i) = g.iter().position(|x| !x.is_finite()) {
                return Ok(Err(format!(
                    "gradient {} at flat index {i} of y_pred {:?}",
                    g[i],
                    p.dims()
                )));
            }
        }
        Ok(Ok(()))
    };
    run().unwrap_or_else(|e| Err(format!("the loss failed: {e}")))
}

/// The loss with another reduction, everything else its own.
struct Reduced<'a>(&'a dyn Loss, Reduction);

impl Loss for Reduced<'_> {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn per_sample(&self, t: &Tensor, p: &Tensor) -> Result<Tensor> {
        self.0.per_sample(t, p)
    }
    fn own_mask(&self, t: &Tensor, p: &Tensor) -> Result<Option<Tensor>> {
        self.0.own_mask(t, p)
    }
    fn reduction(&self) -> Reduction {
        self.1
    }
    fn whole_batch(&self) -> bool {
        self.0.whole_batch()
    }
}

/// Keras 3's reduction of per-sample `values` with per-sample `weights` and a `mask` of the
/// values' shape, written out in f64: the mask rescaled by total / valid for the mean
/// reductions, then weights · mask, then the sum and its divisor.
fn keras_reduce(values: &[f64], weights: &[f64], mask: &[f64], reduction: Reduction) -> Vec<f64> {
    let per = values.len() / weights.len();
    let valid: f64 = mask.iter().sum();
    let scale = match reduction {
        Reduction::Mean | Reduction::SumOverBatchSize if valid > 0.0 => values.len() as f64 / valid,
        Reduction::Mean | Reduction::SumOverBatchSize => 0.0,
        _ => 1.0,
    };
    let combined: Vec<f64> = (0..values.len())
        .map(|i| weights[i / per] * mask[i] * scale)
        .collect();
    let weighted: Vec<f64> = values.iter().zip(&combined).map(|(v, c)| v * c).collect();
    let total: f64 = weighted.iter().sum();
    let divisor = match reduction {
        Reduction::None => return weighted,
        Reduction::Sum => 1.0,
        Reduction::MeanWithSampleWeight => combined.iter().sum(),
        Reduction::SumOverBatchSize | Reduction::Mean => values.len() as f64,
    };
    vec![if divisor == 0.0 { 0.0 } else { total / divisor }]
}

/// Each of the five reductions, and the loss's own `reduced`, against [`keras_reduce`], with
/// sample weights (one of them 0) and a mask (one entry of two masked).
fn reductions(
    loss: &dyn Loss,
    t: &Tensor,
    p: &Tensor,
) -> Vec<(String, std::result::Result<(), String>)> {
    let run = |r: Option<Reduction>| -> Result<std::result::Result<(), String>> {
        let values = loss.per_sample(t, p)?;
        if values.rank() == 0 {
            return Ok(Ok(())); // a whole-batch loss: no per-sample values to weight
        }
        let batch = values.dims()[0];
        let weights: Vec<f64> = (0..batch)
            .map(|i| [0.5, 0.0, 2.0, 1.0, 1.5][i % 5])
            .collect();
        let n = values.elem_count();
        let mask: Vec<f64> = (0..n).map(|i| f64::from(u8::from(i % 2 == 0))).collect();
        let w = tensor(weights.clone(), &[batch])?;
        let m = tensor(mask.clone(), values.dims())?;
        let own = match loss.own_mask(t, p)? {
            Some(own) => f64s(&own)?,
            None => vec![1.0; n],
        };
        let merged: Vec<f64> = mask.iter().zip(&own).map(|(a, b)| a * b).collect();
        let reduction = r.unwrap_or(loss.reduction());
        let expected = keras_reduce(&f64s(&values)?, &weights, &merged, reduction);
        let got = match r {
            Some(r) => Reduced(loss, r).reduced(t, p, Some(&w), Some(&m))?,
            None => loss.reduced(t, p, Some(&w), Some(&m))?,
        };
        let got = f64s(&got)?;
        let agree = got.len() == expected.len()
            && got
                .iter()
                .zip(&expected)
                .all(|(g, e)| (g - e).abs() <= 1e-9 * (1.0 + e.abs()));
        Ok(match agree {
            true => Ok(()),
            false => Err(format!(
                "with sample weights {weights:?} and a mask over every other value, {reduction} \
                 gives {got:?}, Keras' formula {expected:?}"
            )),
        })
    };
    let mut out = vec![(
        format!("the loss's own reduced() ({})", loss.reduction()),
        run(None).unwrap_or_else(|e| Err(format!("the loss failed: {e}"))),
    )];
    for r in [
        Reduction::SumOverBatchSize,
        Reduction::Sum,
        Reduction::Mean,
        Reduction::MeanWithSampleWeight,
        Reduction::None,
    ] {
        out.push((
            r.to_string(),
            run(Some(r)).unwrap_or_else(|e| Err(format!("the loss failed: {e}"))),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::loss_fn;
    use candle_core::{CpuStorage, CustomOp1, Layout, Shape, D};

    fn failed_checks(report: &CheckReport) -> Vec<&'static str> {
        let mut checks: Vec<&str> = report.failures().iter().map(|f| f.check).collect();
        checks.dedup();
        checks
    }

    /// Every built-in loss passes every check on its own domain, but one finding:
    /// categorical generalized crossentropy, `(1 - p_true^q) / q` as Keras writes it (no
    /// clipping), has an infinite derivative at `p_true = 0`, which the probe of a certain wrong
    /// class shows (a NaN, as the one-hot product multiplies it by 0).
    #[test]
    fn every_built_in_loss_passes() {
        let names = [
            "mse",
            "mae",
            "mape",
            "msle",
            "cosine_similarity",
            "huber",
            "log_cosh",
            "hinge",
            "squared_hinge",
            "categorical_hinge",
            "kld",
            "poisson",
            "binary_crossentropy",
            "binary_focal_crossentropy",
            "categorical_crossentropy",
            "categorical_focal_crossentropy",
            "sparse_categorical_crossentropy",
            "ctc",
            "dice",
            "tversky",
            "circle",
            "categorical_generalized_cross_entropy",
        ];
        assert_eq!(names.len(), 22);
        for name in names {
            let report = check(name).unwrap();
            assert!(report.findings.len() >= 8 + 2 + 2 + 12, "{report}");
            if name == "categorical_generalized_cross_entropy" {
                let failures = report.failures();
                assert_eq!(failures.len(), 1, "{report}");
                assert_eq!(failures[0].check, "finite", "{report}");
                assert!(failures[0].case.contains("wrong class"), "{report}");
                continue;
            }
            assert!(report.passed(), "{report}");
        }
    }

    /// A loss whose value for a sample depends on the next sample's row fails the contract,
    /// and only it.
    #[test]
    fn a_loss_that_mixes_samples_fails_the_contract() {
        let mixing = loss_fn("mixing", |t: &Tensor, p: &Tensor| {
            let v = (p - t.to_dtype(p.dtype())?)?.sqr()?.mean(D::Minus1)?;
            let v = if v.rank() > 1 { v.mean(D::Minus1)? } else { v };
            let n = v.dims()[0];
            // Each sample plus a tenth of the next one's value.
            let next = Tensor::cat(&[v.narrow(0, 1, n - 1)?, v.narrow(0, 0, 1)?], 0)?;
            Ok((v + (next * 0.1)?)?)
        });
        let report = check(mixing).unwrap();
        assert_eq!(failed_checks(&report), ["contract"], "{report}");
        let text = report.to_string();
        assert!(
            text.contains("FAIL contract") && text.contains("mixes samples"),
            "{text}"
        );
    }

    /// `x²` whose backward pass says `3x`.
    struct WrongSquare;

    impl CustomOp1 for WrongSquare {
        fn name(&self) -> &'static str {
            "wrong-square"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            let CpuStorage::F64(v) = s else {
                candle_core::bail!("f64 only")
            };
            let v = &v[l.start_offset()..l.start_offset() + l.shape().elem_count()];
            Ok((
                CpuStorage::F64(v.iter().map(|x| x * x).collect()),
                l.shape().clone(),
            ))
        }
        fn bwd(
            &self,
            x: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<Option<Tensor>> {
            Ok(Some(grad.mul(&(x * 3.0)?)?))
        }
    }

    /// A wrong backward pass (a custom op) and a step that is not differentiable fail the
    /// gradient check, saying where.
    #[test]
    fn wrong_and_missing_gradients_fail_the_gradient_check() {
        let wrong = loss_fn("wrong_gradient", |t: &Tensor, p: &Tensor| {
            let d = (p - t.to_dtype(p.dtype())?)?
                .contiguous()?
                .apply_op1(WrongSquare)?;
            Ok(d.flatten_from(1)?.mean(D::Minus1)?)
        });
        let report = check(wrong).unwrap();
        assert!(failed_checks(&report).contains(&"gradient"), "{report}");
        let problem = report
            .failures()
            .iter()
            .find(|f| f.check == "gradient")
            .unwrap()
            .problem
            .clone();
        assert!(problem.unwrap().contains("finite differences"), "{report}");
        let step = loss_fn("step", |t: &Tensor, p: &Tensor| {
            let far = (p - t.to_dtype(p.dtype())?)?
                .abs()?
                .ge(0.3)?
                .to_dtype(p.dtype())?;
            Ok(far.flatten_from(1)?.mean(D::Minus1)?)
        });
        let report = check(step).unwrap();
        assert_eq!(failed_checks(&report), ["gradient"], "{report}");
        assert!(
            report.to_string().contains("no gradient reaches y_pred"),
            "{report}"
        );
    }

    /// A loss whose `reduced` ignores the sample weights fails the reduction check (and only
    /// its own reduced(), not the five reductions of its per-sample values).
    #[test]
    fn a_reduction_that_ignores_sample_weights_fails() {
        struct Unweighted;
        impl Loss for Unweighted {
            fn name(&self) -> &str {
                "unweighted"
            }
            fn per_sample(&self, t: &Tensor, p: &Tensor) -> Result<Tensor> {
                Ok((p - t.to_dtype(p.dtype())?)?
                    .sqr()?
                    .flatten_from(1)?
                    .mean(D::Minus1)?)
            }
            fn reduced(
                &self,
                t: &Tensor,
                p: &Tensor,
                _w: Option<&Tensor>,
                _m: Option<&Tensor>,
            ) -> Result<Tensor> {
                Ok(self.per_sample(t, p)?.mean_all()?)
            }
        }
        let report = check_in(Arc::new(Unweighted), Domain::Real).unwrap();
        assert_eq!(failed_checks(&report), ["reduction"], "{report}");
        assert!(
            report
                .failures()
                .iter()
                .all(|f| f.case.starts_with("the loss's own")),
            "{report}"
        );
    }

    /// Keras' formula, by hand: values 1..4, weights 1 and 2 per sample of two values, mask
    /// off on the second value of each sample.
    #[test]
    fn keras_reduce_is_keras_arithmetic() {
        let (v, w, m) = ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0], [1.0, 0.0, 1.0, 0.0]);
        // weighted: 1·1·2 + 3·2·2 = 14 (mask ×4/2), over 4 values.
        assert_eq!(keras_reduce(&v, &w, &m, Reduction::SumOverBatchSize), [3.5]);
        assert_eq!(keras_reduce(&v, &w, &m, Reduction::Sum), [7.0]);
        assert_eq!(
            keras_reduce(&v, &w, &m, Reduction::MeanWithSampleWeight),
            [7.0 / 3.0]
        );
        assert_eq!(
            keras_reduce(&v, &w, &m, Reduction::None),
            [1.0, 0.0, 6.0, 0.0]
        );
    }
}
