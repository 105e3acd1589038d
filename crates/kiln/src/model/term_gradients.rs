//! Per-term gradients: each term of a step's total (each output's weighted loss, each added
//! term, the adversarial term) differentiated on its own over the trainable weights, one
//! backward pass per term on the step's own graph. Gradient diagnostics (`Fit::
//! gradient_diagnostics`) read norms and cosines from them; loss-weighting strategies that
//! combine the terms' gradients (PCGrad, GradNorm) start from them.

use super::compile::not_compiled;
use super::history::Accumulator;
use super::Model;
use crate::data::Dataset;
use crate::distributed::StepShard;
use crate::error::Result;
use crate::gradients::Gradients;
use candle_core::{DType, Tensor, Var};

/// One term's gradient, from [`Model::term_gradients`].
#[derive(Debug, Clone)]
pub struct TermGradient {
    /// The name the history reports the term by: `<output>_loss`, an added term's name
    /// (`l2`, …), the adversarial term's name; `loss` when the total is one output's loss
    /// alone.
    pub name: String,
    /// The term's value as it enters the total (an output's loss times its loss weight).
    pub value: f64,
    /// Its gradient over each trainable weight, in [`TermGradients::weights`] order; `None`
    /// for a weight the term does not depend on.
    pub gradients: Vec<Option<Tensor>>,
}

/// The gradient of every term of one batch's total, from [`Model::term_gradients`].
#[derive(Debug, Clone)]
pub struct TermGradients {
    /// The trainable weights' names, in [`Model::trainable_weights`] order.
    pub weights: Vec<String>,
    /// Each term, in the order the history lists them.
    pub terms: Vec<TermGradient>,
    /// The gradient of the total, as the training step applies it (the sum of the terms'
    /// gradients up to rounding; under a strategy that combines gradients, PCGrad or
    /// GradNorm, its combination), `None` for a weight the total does not depend on.
    pub total: Vec<Option<Tensor>>,
    /// Which weights are shared: those two or more terms depend on (every weight the only
    /// term depends on, when the total has one term). Norms and cosines are taken over these.
    pub shared: Vec<bool>,
}

impl TermGradients {
    /// The term named `name`.
    pub fn term(&self, name: &str) -> Option<&TermGradient> {
        self.terms.iter().find(|t| t.name == name)
    }

    /// The names of the shared weights.
    pub fn shared_weights(&self) -> Vec<&str> {
        self.weights
            .iter()
            .zip(&self.shared)
            .filter(|(_, s)| **s)
            .map(|(w, _)| w.as_str())
            .collect()
    }

    /// The L2 norm of the gradient of term `name` over the shared weights.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] naming the terms when there is no term `name`; a
    /// tensor error when a gradient cannot be read.
    pub fn norm(&self, name: &str) -> Result<f64> {
        let g = gram(&[self.gradients_of(name)?.clone()], &self.shared)?;
        Ok(g[0][0].sqrt())
    }

    /// The cosine between the gradients of terms `a` and `b` over the shared weights; 0 when
    /// either gradient is zero there (as PyTorch's `cosine_similarity`).
    ///
    /// # Errors
    /// As [`TermGradients::norm`].
    pub fn cosine(&self, a: &str, b: &str) -> Result<f64> {
        let pair = [self.gradients_of(a)?.clone(), self.gradients_of(b)?.clone()];
        let g = gram(&pair, &self.shared)?;
        Ok(cosine_of(g[0][1], g[0][0], g[1][1]))
    }

    /// Term `name`'s gradients.
    fn gradients_of(&self, name: &str) -> Result<&Vec<Option<Tensor>>> {
        self.term(name).map(|t| &t.gradients).ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "no term named `{name}`; the terms are {:?}",
                self.terms.iter().map(|t| &t.name).collect::<Vec<_>>()
            ))
        })
    }
}

/// Each term's gradient over each trainable weight, in the order of the terms and of the
/// weights; `None` where the term does not depend on the weight.
pub(crate) type PerTerm = Vec<Vec<Option<Tensor>>>;

/// The one per-term gradient loop, for diagnostics and for the strategies that combine the
/// terms' gradients (PCGrad, GradNorm): one backward pass per term (each with its graph, on
/// the fused kernels' paths like the step's own pass) over `trainable`, detached. With a
/// `shard`, each term's gradients are summed over the ranks (one all-reduce), so that they
/// are the global batch's.
pub(crate) fn per_term<'a>(
    terms: impl IntoIterator<Item = &'a Tensor>,
    trainable: &[Var],
    shard: Option<&StepShard>,
) -> Result<PerTerm> {
    let mut gradients: PerTerm = terms
        .into_iter()
        .map(|term| {
            let mut grads = Gradients::default();
            grads.backward(term)?;
            Ok(grads
                .take_each(trainable)?
                .into_iter()
                .map(|g| g.map(|g| g.detach()))
                .collect())
        })
        .collect::<Result<_>>()?;
    if let Some(shard) = shard {
        shard.all_reduce_term_gradients(&mut gradients)?;
    }
    Ok(gradients)
}

/// Which weights are shared among the terms: depended on by two terms or more, or by the
/// only term.
pub(crate) fn shared(gradients: &[Vec<Option<Tensor>>], weights: usize) -> Vec<bool> {
    let needed = if gradients.len() == 1 { 1 } else { 2 };
    (0..weights)
        .map(|i| gradients.iter().filter(|g| g[i].is_some()).count() >= needed)
        .collect()
}

/// Some term's gradient of weight `i` (for its shape), if any term has one.
pub(crate) fn like(gradients: &[Vec<Option<Tensor>>], i: usize) -> Option<&Tensor> {
    gradients.iter().find_map(|g| g[i].as_ref())
}

/// Term `term`'s gradients over the weights `keep` selects, in f64, concatenated (zeros
/// where the term does not depend on a selected weight that another term does).
pub(crate) fn flat(
    gradients: &[Vec<Option<Tensor>>],
    term: usize,
    keep: &[bool],
) -> Result<Vec<f64>> {
    let mut flat = Vec::new();
    for (i, k) in keep.iter().enumerate() {
        if !k {
            continue;
        }
        match (&gradients[term][i], like(gradients, i)) {
            (Some(g), _) => flat.extend(g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?),
            (None, Some(l)) => flat.resize(flat.len() + l.elem_count(), 0.0),
            (None, None) => {}
        }
    }
    Ok(flat)
}

/// `a · b`, summed in eight lanes (a single running sum cannot be vectorized).
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0.0; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// The cosine from the dot product and the two squared norms; 0 when a norm is 0.
fn cosine_of(ab: f64, aa: f64, bb: f64) -> f64 {
    let denominator = (aa * bb).sqrt();
    if denominator == 0.0 {
        0.0
    } else {
        ab / denominator
    }
}

/// How many elements of each gradient [`gram`] holds at once: with up to a few terms, the
/// blocks of all of them stay in the core's L2 cache while every pair is multiplied.
const BLOCK: usize = 4096;

/// A gradient's elements as [`gram`] reads them: in place when a contiguous f32 or f64 CPU
/// tensor, else copied once to f64.
enum Elements<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    Owned(Vec<f64>),
}

impl Elements<'_> {
    /// Elements `start..start + out.len()`, in f64.
    fn fill(&self, start: usize, out: &mut [f64]) {
        let end = start + out.len();
        match self {
            Elements::F32(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..end]) {
                    *o = f64::from(*x);
                }
            }
            Elements::F64(v) => out.copy_from_slice(&v[start..end]),
            Elements::Owned(v) => out.copy_from_slice(&v[start..end]),
        }
    }
}

/// Whether `t`'s elements can be read in place.
fn in_place(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && t.is_contiguous()
}

/// The Gram matrix of the terms' gradients over the `shared` weights: entry (i, j) is
/// gᵢ · gⱼ in f64 (a term without a gradient of a weight counts as zeros there). Every norm
/// and cosine of K terms comes from its K(K+1)/2 entries, and each gradient is read once,
/// block by block, every pair multiplied while the block is in cache (not once per pair from
/// memory, nor copied whole to f64 first).
pub(crate) fn gram(gradients: &[Vec<Option<Tensor>>], shared: &[bool]) -> Result<Vec<Vec<f64>>> {
    let k = gradients.len();
    let mut gram = vec![vec![0.0; k]; k];
    let mut blocks = vec![vec![0.0f64; BLOCK]; k];
    for (w, _) in shared.iter().enumerate().filter(|(_, s)| **s) {
        let present: Vec<(usize, &Tensor)> = gradients
            .iter()
            .enumerate()
            .filter_map(|(t, g)| g[w].as_ref().map(|g| (t, g)))
            .collect();
        let Some(&(_, first)) = present.first() else {
            continue;
        };
        let n = first.elem_count();
        let copies: Vec<Option<Vec<f64>>> = present
            .iter()
            .map(|(_, g)| match in_place(g) {
                true => Ok(None),
                false => Ok(Some(
                    g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                )),
            })
            .collect::<Result<_>>()?;
        let storages: Vec<_> = present
            .iter()
            .map(|(_, g)| g.storage_and_layout())
            .collect();
        let elements: Vec<Elements<'_>> = storages
            .iter()
            .zip(copies)
            .map(|((storage, layout), copy)| {
                if let Some(copy) = copy {
                    return Ok(Elements::Owned(copy));
                }
                let candle_core::Storage::Cpu(cpu) = &**storage else {
                    unreachable!("in_place checked the device");
                };
                let what = "a term's gradient";
                Ok(match cpu {
                    candle_core::CpuStorage::F32(v) => {
                        Elements::F32(crate::cpu::contiguous(v, layout, what)?)
                    }
                    candle_core::CpuStorage::F64(v) => {
                        Elements::F64(crate::cpu::contiguous(v, layout, what)?)
                    }
                    _ => unreachable!("in_place checked the dtype"),
                })
            })
            .collect::<Result<_>>()?;
        let mut start = 0;
        while start < n {
            let len = BLOCK.min(n - start);
            for (e, (t, _)) in elements.iter().zip(&present) {
                e.fill(start, &mut blocks[*t][..len]);
            }
            for (a, (i, _)) in present.iter().enumerate() {
                for (j, _) in &present[a..] {
                    gram[*i][*j] += dot(&blocks[*i][..len], &blocks[*j][..len]);
                }
            }
            start += len;
        }
    }
    // Only the upper triangle was summed; the matrix is symmetric.
    let upper = gram.clone();
    for (i, row) in gram.iter_mut().enumerate() {
        for (j, entry) in row.iter_mut().enumerate().take(i) {
            *entry = upper[j][i];
        }
    }
    Ok(gram)
}

/// Adds one batch's diagnostics to the epoch's means, weighted by its `samples`: the norm of
/// every term's gradient over the shared weights, and the cosine of every pair, in term order
/// (`names`, the history's names of the terms of `gradients`), as `grad_norm/<term>` and
/// `grad_cos/<a>/<b>` (the accumulator's logs add `val_` on validation data).
pub(super) fn record_diagnostics(
    acc: &mut Accumulator,
    names: &[&str],
    gradients: &[Vec<Option<Tensor>>],
    samples: f64,
) -> Result<()> {
    let Some(first) = gradients.first() else {
        return Ok(());
    };
    let gram = gram(gradients, &shared(gradients, first.len()))?;
    let squares: Vec<f64> = (0..gradients.len()).map(|i| gram[i][i]).collect();
    for (name, square) in names.iter().zip(&squares) {
        acc.add_diagnostic(
            &format!("grad_norm/{name}"),
            square.sqrt() * samples,
            samples,
        );
    }
    for (i, a) in names.iter().enumerate() {
        for (j, b) in names.iter().enumerate().skip(i + 1) {
            let key = format!("grad_cos/{a}/{b}");
            let cos = cosine_of(gram[i][j], squares[i], squares[j]);
            acc.add_diagnostic(&key, cos * samples, samples);
        }
    }
    Ok(())
}

impl Model {
    /// The gradient of each term of a batch's total over the trainable weights, one backward
    /// pass per term, in training mode as the next step of `fit` or `train_on_batch` would
    /// run it (the same dropout masks as `train_on_batch` on this batch), without updating any
    /// weight; a BatchNormalization still updates its moving statistics. The terms are named
    /// as the history names them, and their gradients sum to the step's total gradient
    /// (under a loss weighting strategy, each term's gradient is before the strategy's
    /// weight, and `total` is what the step applies: see [`TermGradients::total`]).
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([1]);
    /// let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones)
    ///     .kernel_regularizer(L2::new(0.5)).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Sgd::new(0.1)).loss("mse"))?;
    /// let batch = Dataset::new(Tensor::new(&[[2f32]], &Device::Cpu)?, Tensor::new(&[[0f32]], &Device::Cpu)?)?;
    /// let g = model.term_gradients(&batch)?;
    /// let names: Vec<&str> = g.terms.iter().map(|t| t.name.as_str()).collect();
    /// assert_eq!(names, ["dense_loss", "l2"]);
    /// // d/dw (2w)² = 8w and d/dw 0.5·w² = w, at w = 1; the total's gradient is their sum.
    /// let value = |t: &Option<Tensor>| t.as_ref().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    /// assert_eq!(value(&g.terms[0].gradients[0]), [8.0]);
    /// assert_eq!(value(&g.terms[1].gradients[0]), [1.0]);
    /// assert_eq!(value(&g.total[0]), [9.0]);
    /// assert_eq!(g.norm("dense_loss")?, 8.0);
    /// assert_eq!(g.cosine("dense_loss", "l2")?, 1.0);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`crate::Error::State`] before `compile`; the errors of a training step.
    pub fn term_gradients(&self, batch: &Dataset) -> Result<TermGradients> {
        let compiled = self.compiled.as_ref().ok_or_else(not_compiled)?;
        let batch = batch.to_device(&self.device)?;
        // The randomness of the step `train_on_batch` would take next.
        let mut random = crate::random::StepRandom::new(0, compiled.iterations);
        crate::runtime::on_matmul_pool(|| {
            // A loss weighting strategy's state is read, not advanced.
            let step = self.step_gradients(compiled, &batch, &mut random, false)?;
            let parts = &step.terms.parts;
            let per_term = per_term(parts.iter().map(|(_, t)| t), &step.trainable, None)?;
            let shared = shared(&per_term, step.trainable.len());
            let terms = per_term
                .into_iter()
                .zip(parts)
                .map(|(gradients, (name, value))| {
                    Ok(TermGradient {
                        name: name.clone(),
                        value: value.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                        gradients,
                    })
                })
                .collect::<Result<_>>()?;
            let names = self.trainable_weights().into_iter().map(|w| w.name);
            Ok(TermGradients {
                weights: names.collect(),
                terms,
                total: step
                    .gradients
                    .into_iter()
                    .map(|g| g.map(|g| g.detach()))
                    .collect(),
                shared,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use candle_core::{Device, Tensor};

    /// Two heads over a tanh trunk (smooth, for finite differences), an L2 penalty, an
    /// activity term over the trunk, and optionally FGSM; in f64 unless `dtype` says.
    fn model(adversarial: bool, dtype: DType) -> crate::Result<(Model, Dataset)> {
        let d = Device::Cpu;
        let x = Input::new([6]);
        let h = Dense::new(5)
            .with_name("trunk")
            .activation(Activation::Tanh)
            .kernel_regularizer(L2::new(0.03))
            .apply(&x)?;
        let digit = Dense::new(3).with_name("digit").apply(&h)?;
        let parity = Dense::new(1).with_name("parity").apply(&h)?;
        let mut model = Model::builder(&[&x], &[&digit, &parity])
            .seed(3)
            .dtype(dtype)
            .build()?;
        let trunk = h.clone();
        model.add_loss("sparsity", move |t| {
            Ok((t.get(&trunk)?.abs()?.mean_all()? * 0.2)?)
        })?;
        if adversarial {
            model.add_loss_term("adversarial", Adversarial::fgsm(0.1).multiplier(0.7))?;
        }
        model.compile(
            Compile::new(Sgd::new(0.1))
                .loss_for(
                    "digit",
                    SparseCategoricalCrossentropy::new().from_logits(true),
                )
                .loss_for("parity", BinaryCrossentropy::new().from_logits(true))
                .loss_weight_for("parity", 0.5),
        )?;
        let n = 12;
        let xs: Vec<f64> = (0..n * 6)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0)
            .collect();
        let digits: Vec<f64> = (0..n).map(|i| (i % 3) as f64).collect();
        let odd: Vec<f64> = (0..n).map(|i| ((i / 2) % 2) as f64).collect();
        let data = Dataset::multi(
            vec![Tensor::from_vec(xs, (n, 6), &d)?.to_dtype(dtype)?],
            vec![
                Tensor::from_vec(digits, n, &d)?.to_dtype(dtype)?,
                Tensor::from_vec(odd, (n, 1), &d)?.to_dtype(dtype)?,
            ],
        )?;
        Ok((model, data))
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The terms are named as the history names them, and their gradients sum to the gradient
    /// the training step applies (relative 1e-6 in f64), the adversarial term included.
    #[test]
    fn term_gradients_sum_to_the_step_gradient() {
        for adversarial in [false, true] {
            let (model, data) = model(adversarial, DType::F64).unwrap();
            let g = model.term_gradients(&data).unwrap();
            let names: Vec<&str> = g.terms.iter().map(|t| t.name.as_str()).collect();
            let mut expected = vec!["digit_loss", "parity_loss", "l2", "sparsity"];
            if adversarial {
                expected.push("adversarial");
            }
            assert_eq!(names, expected);
            let logs = model.evaluate(&data, 100).unwrap();
            for name in ["l2", "sparsity"] {
                assert!((g.term(name).unwrap().value - logs.get(name).unwrap()).abs() < 1e-12);
            }
            let parity = logs.get("parity_loss").unwrap();
            assert!((g.term("parity_loss").unwrap().value - 0.5 * parity).abs() < 1e-12);
            for (i, total) in g.total.iter().enumerate() {
                let total = values(total.as_ref().unwrap());
                let mut sum = vec![0.0; total.len()];
                for t in &g.terms {
                    if let Some(t) = &t.gradients[i] {
                        sum.iter_mut().zip(values(t)).for_each(|(s, v)| *s += v);
                    }
                }
                let scale = total.iter().fold(0f64, |m, v| m.max(v.abs()));
                let error = total
                    .iter()
                    .zip(&sum)
                    .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    scale > 0.0 && error <= 1e-6 * scale,
                    "{}: {error} vs {scale}",
                    g.weights[i]
                );
            }
            // Without FGSM the heads are each one loss's (the penalty does not reach them) and
            // only the trunk is shared; the adversarial term reaches every weight.
            let shared = g.shared_weights();
            match adversarial {
                false => assert_eq!(shared, ["trunk/kernel", "trunk/bias"]),
                true => assert_eq!(shared, g.weights),
            }
            assert!(g.term("l2").unwrap().gradients[1].is_none());
        }
    }

    /// A lone output loss is the history's `loss`; a lone added term keeps its own name, as
    /// the history reports it.
    #[test]
    fn a_lone_term_has_the_history_name() {
        let names = |added_only: bool| -> Vec<String> {
            let x = Input::new([2]);
            let h = Dense::new(2).apply(&x).unwrap();
            let mut model = Model::builder(&[&x], &[&h])
                .dtype(DType::F64)
                .build()
                .unwrap();
            let mut compile = Compile::new(Sgd::new(0.1));
            if added_only {
                let out = h.clone();
                model
                    .add_loss("energy", move |t| Ok(t.get(&out)?.sqr()?.mean_all()?))
                    .unwrap();
            } else {
                compile = compile.loss("mse");
            }
            model.compile(compile).unwrap();
            let d = Device::Cpu;
            let xs = Tensor::new(&[[1f64, 2.], [3., 4.]], &d).unwrap();
            let data = Dataset::new(xs.clone(), xs).unwrap();
            let history = model
                .fit(&data, Fit::new().quiet().gradient_diagnostics(true))
                .unwrap();
            let keys: Vec<String> = history.series().into_keys().collect();
            let g = model.term_gradients(&data).unwrap();
            let names: Vec<String> = g.terms.iter().map(|t| t.name.clone()).collect();
            for n in &names {
                assert!(keys.contains(n), "{n} is not in the history {keys:?}");
                assert!(keys.contains(&format!("grad_norm/{n}")), "{keys:?}");
            }
            names
        };
        assert_eq!(names(false), ["loss"]);
        assert_eq!(names(true), ["energy"]);
    }

    /// Each term's gradient matches central finite differences of that term's value (f64,
    /// h = 1e-5), over every entry of every weight. (The adversarial term is left out: its
    /// perturbation is held constant, so its gradient is not the derivative of its value.)
    #[test]
    fn term_gradients_match_finite_differences() {
        let (model, data) = model(false, DType::F64).unwrap();
        let g = model.term_gradients(&data).unwrap();
        let value = |name: &str| -> f64 {
            let logs = model.evaluate(&data, 100).unwrap();
            let weight = if name == "parity_loss" { 0.5 } else { 1.0 };
            weight * logs.get(name).unwrap()
        };
        let h = 1e-5;
        let mut checked = 0;
        for (i, w) in model.trainable_weights().iter().enumerate() {
            let original = values(w.var.as_tensor());
            for j in 0..original.len() {
                let at = |delta: f64| {
                    let mut v = original.clone();
                    v[j] += delta;
                    let t = Tensor::from_vec(v, w.var.shape(), &Device::Cpu).unwrap();
                    w.var.set(&t).unwrap();
                };
                for term in &g.terms {
                    at(h);
                    let up = value(&term.name);
                    at(-h);
                    let down = value(&term.name);
                    at(0.0);
                    let fd = (up - down) / (2.0 * h);
                    let analytic = term.gradients[i].as_ref().map_or(0.0, |t| values(t)[j]);
                    assert!(
                        (fd - analytic).abs() <= 1e-6 * (1.0 + analytic.abs()),
                        "{} of {}[{j}]: finite differences {fd}, gradient {analytic}",
                        term.name,
                        g.weights[i]
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 4 * (6 * 5 + 5 + 5 * 3 + 3 + 5 + 1));
    }

    /// Diagnostics do not change what is learned (f32: the fused CPU kernels' paths), and the
    /// epoch's values are the sample-weighted means of each batch's norms and cosines.
    #[test]
    fn diagnostics_leave_training_unchanged_and_average_the_batches() {
        for adversarial in [false, true] {
            let train = |on: bool| {
                let (mut model, data) = model(adversarial, DType::F32).unwrap();
                let fit = Fit::new()
                    .epochs(3)
                    .batch_size(5)
                    .quiet()
                    .gradient_diagnostics(on);
                let history = model.fit(&data, fit).unwrap();
                let weights: Vec<Vec<u32>> = model
                    .weights()
                    .iter()
                    .map(|w| {
                        let v: Vec<f32> =
                            w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                        v.iter().map(|x| x.to_bits()).collect()
                    })
                    .collect();
                (history, weights)
            };
            let (off, off_weights) = train(false);
            let (on, on_weights) = train(true);
            assert_eq!(off_weights, on_weights);
            let mut plain = on.clone();
            for key in on.series().keys().filter(|k| k.starts_with("grad_")) {
                plain = plain.without(key);
            }
            assert_eq!(plain.without("epoch_time_s"), off.without("epoch_time_s"));
            let keys: Vec<String> = on
                .series()
                .into_keys()
                .filter(|k| k.starts_with("grad_"))
                .collect();
            let terms = if adversarial { 5 } else { 4 };
            assert_eq!(keys.len(), terms + terms * (terms - 1) / 2, "{keys:?}");
        }
        // With a zero learning rate every batch sees the same weights: the epoch's value is
        // the mean of the batches' (12 samples in batches of 5, 5, 2), weighted by size.
        let (mut model, data) = model(true, DType::F64).unwrap();
        model.set_learning_rate(0.0).unwrap();
        let batches: Vec<_> = [(0, 5), (5, 5), (10, 2)]
            .iter()
            .map(|&(s, n)| {
                (
                    n as f64,
                    model.term_gradients(&data.slice(s, n).unwrap()).unwrap(),
                )
            })
            .collect();
        let fit = Fit::new()
            .batch_size(5)
            .shuffle(false)
            .quiet()
            .gradient_diagnostics(true);
        let history = model.fit(&data, fit).unwrap();
        let logs = history.last().unwrap();
        let mean = |f: &dyn Fn(&super::TermGradients) -> f64| {
            batches.iter().map(|(n, g)| n * f(g)).sum::<f64>() / 12.0
        };
        let norm = mean(&|g| g.norm("digit_loss").unwrap());
        let cos = mean(&|g| g.cosine("parity_loss", "adversarial").unwrap());
        assert!((logs.get("grad_norm/digit_loss").unwrap() - norm).abs() < 1e-12 * norm);
        assert!((logs.get("grad_cos/parity_loss/adversarial").unwrap() - cos).abs() < 1e-12);
        assert!(cos.abs() > 1e-3 && norm > 1e-3);
    }
}
