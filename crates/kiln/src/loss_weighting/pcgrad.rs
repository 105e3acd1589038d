//! PCGrad (Yu, Kumar, Gupta, Levine, Hausman and Finn 2020, "Gradient Surgery for Multi-Task
//! Learning"): over the shared weights, each term's gradient `g_i` is projected onto the normal
//! plane of every other term's gradient `g_j` it conflicts with (`g_i · g_j < 0`), the others
//! taken in a random order, and the projected gradients are summed. A weight only one term
//! reaches (a head's own) gets that term's gradient unchanged, as in the paper's code and
//! LibMTL.

use super::{dot, weighted_sum, GradientStep, Strategy};
use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// PCGrad: gradient surgery on conflicting terms. It sets no weights: every term's weight is 1
/// in the history (`loss_weight/<term>`), and what changes is the direction of the step.
///
/// Cost per step: one backward pass per weighed term (instead of one for the total), plus one
/// for the terms it does not weigh, and the projections (a few dot products over the shared
/// weights per pair of terms). The order in which each term meets the others is drawn for
/// every step from a seed the trainer draws from the run's seed, so a run, and a resumed run,
/// is reproducible; [`PCGrad::shuffle`]`(false)` takes them in term order instead.
///
/// ```
/// use kiln::loss_weighting::PCGrad;
/// use kiln::prelude::*;
/// let x = Input::new([4]);
/// let h = Dense::new(8).activation(Activation::Tanh).apply(&x)?;
/// let a = Dense::new(3).with_name("a").apply(&h)?;
/// let b = Dense::new(1).with_name("b").apply(&h)?;
/// let mut model = Model::new(&[x], &[a, b])?;
/// model.compile(
///     Compile::new(Sgd::new(0.1))
///         .loss_for("a", SparseCategoricalCrossentropy::new().from_logits(true))
///         .loss_for("b", "mse")
///         .loss_weighting(PCGrad::new()),
/// )?;
/// // With three terms, each term's order of the others (here from seed 7):
/// let order = PCGrad::projection_order(7, 3);
/// assert_eq!(order.len(), 3);
/// assert!(order[0].contains(&1) && order[0].contains(&2));
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PCGrad {
    shuffle: bool,
    terms: usize,
}

impl Default for PCGrad {
    fn default() -> Self {
        Self::new()
    }
}

impl PCGrad {
    /// PCGrad with a random projection order every step, as the paper.
    pub fn new() -> Self {
        Self {
            shuffle: true,
            terms: 0,
        }
    }

    /// Whether each step draws the order in which a term is projected against the others
    /// (default true, as the paper); `false` takes them in term order, for comparisons with
    /// other implementations. (With two terms the order makes no difference.)
    pub fn shuffle(mut self, on: bool) -> Self {
        self.shuffle = on;
        self
    }

    /// The order, for each of `terms` terms, in which a step with `seed` projects it against
    /// the others: a permutation of the other terms' indices, each drawn in turn from one
    /// generator seeded with `seed`.
    pub fn projection_order(seed: u64, terms: usize) -> Vec<Vec<usize>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..terms)
            .map(|i| {
                let mut others: Vec<usize> = (0..terms).filter(|&j| j != i).collect();
                others.shuffle(&mut rng);
                others
            })
            .collect()
    }

    fn order(&self, seed: u64, terms: usize) -> Vec<Vec<usize>> {
        match self.shuffle {
            true => Self::projection_order(seed, terms),
            false => (0..terms)
                .map(|i| (0..terms).filter(|&j| j != i).collect())
                .collect(),
        }
    }
}

/// Σ_i PCGrad(g_i): each `g_i` projected, in `order[i]`, off every original `g_j` it has a
/// negative dot product with.
pub(crate) fn project(gradients: &[Vec<f64>], order: &[Vec<usize>]) -> Vec<f64> {
    let squares: Vec<f64> = gradients.iter().map(|g| dot(g, g)).collect();
    let mut sum = vec![0.0; gradients.first().map_or(0, Vec::len)];
    for (g, others) in gradients.iter().zip(order) {
        let mut pc = g.clone();
        for &j in others {
            let d = dot(&pc, &gradients[j]);
            // d < 0 implies |g_j|² > 0.
            if d < 0.0 {
                let c = d / squares[j];
                pc.iter_mut()
                    .zip(&gradients[j])
                    .for_each(|(p, q)| *p -= c * q);
            }
        }
        sum.iter_mut().zip(&pc).for_each(|(s, p)| *s += p);
    }
    sum
}

impl Strategy for PCGrad {
    fn name(&self) -> &str {
        "pcgrad"
    }
    fn begin(&mut self, terms: &[String], _dtype: DType, _device: &Device) -> Result<()> {
        self.terms = terms.len();
        Ok(())
    }
    fn combine(&mut self, terms: &[Tensor]) -> Result<Tensor> {
        weighted_sum(terms, &vec![1.0; terms.len()])
    }
    fn weights(&self) -> Result<Vec<f64>> {
        Ok(vec![1.0; self.terms])
    }
    fn combines_gradients(&self) -> bool {
        true
    }
    fn combine_gradients(
        &mut self,
        step: &GradientStep<'_>,
        _advance: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let n = step.gradients.len();
        let shared = step.shared();
        let flat: Vec<Vec<f64>> = (0..n)
            .map(|t| step.flat(t, &shared))
            .collect::<Result<_>>()?;
        let projected = project(&flat, &self.order(step.seed, n));
        let on_shared = step.unflatten(&projected, &shared)?;
        let own = super::scaled_sum(step.gradients, &vec![1.0; n], step.weights.len())?;
        Ok(shared
            .iter()
            .zip(on_shared.into_iter().zip(own))
            .map(|(s, (p, o))| if *s { p } else { o })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two conflicting gradients: each loses its component along the other (the paper's
    /// figure), and the order draw is a permutation of the others, fixed by the seed.
    #[test]
    fn projects_conflicting_gradients_only() {
        let g = vec![vec![1.0, 0.0], vec![-1.0, 1.0]];
        // g1·g2 = -1: g1 - (-1/2) g2 = (0.5, 0.5); g2 - (-1/1) g1 = (0, 1).
        let sum = project(&g, &[vec![1], vec![0]]);
        assert_eq!(sum, vec![0.5, 1.5]);
        // Agreeing gradients are summed as they are.
        let g = vec![vec![1.0, 0.5], vec![2.0, -0.5]];
        assert_eq!(project(&g, &[vec![1], vec![0]]), vec![3.0, 0.0]);
        let a = PCGrad::projection_order(11, 4);
        assert_eq!(a, PCGrad::projection_order(11, 4));
        for (i, others) in a.iter().enumerate() {
            let mut sorted = others.clone();
            sorted.sort_unstable();
            let want: Vec<usize> = (0..4).filter(|&j| j != i).collect();
            assert_eq!(sorted, want);
        }
        let draws: std::collections::HashSet<Vec<Vec<usize>>> =
            (0..20).map(|s| PCGrad::projection_order(s, 4)).collect();
        assert!(draws.len() > 10, "the order hardly depends on the seed");
    }

    /// Through the trait: the shared weight is projected in the order drawn from the step's
    /// seed (which, for some seeds, differs from term order), and a weight one term reaches
    /// keeps that term's gradient.
    #[test]
    fn combine_gradients_uses_the_drawn_order_on_shared_weights_only() {
        let d = Device::Cpu;
        let t = |v: &[f64]| Some(Tensor::new(v, &d).unwrap());
        let gradients = vec![
            vec![t(&[1.0, 0.0]), t(&[5.0])],
            vec![t(&[-1.0, 1.0]), None],
            vec![t(&[-1.0, -2.0]), None],
        ];
        let weights = ["trunk/kernel".to_string(), "head/kernel".to_string()];
        let flat = vec![vec![1.0, 0.0], vec![-1.0, 1.0], vec![-1.0, -2.0]];
        let mut s = PCGrad::new();
        s.begin(&["a".into(), "b".into(), "c".into()], DType::F64, &d)
            .unwrap();
        let fixed = project(&flat, &PCGrad::new().shuffle(false).order(0, 3));
        let mut differs = false;
        for seed in 0..16 {
            let step = GradientStep {
                weights: &weights,
                values: &[1.0, 1.0, 1.0],
                gradients: &gradients,
                seed,
            };
            let g = s.combine_gradients(&step, true).unwrap();
            let got: Vec<f64> = g[0].as_ref().unwrap().to_vec1().unwrap();
            assert_eq!(got, project(&flat, &PCGrad::projection_order(seed, 3)));
            assert_eq!(g[1].as_ref().unwrap().to_vec1::<f64>().unwrap(), [5.0]);
            differs |= got != fixed;
        }
        assert!(differs, "no seed drew an order other than term order");
        assert_eq!(s.weights().unwrap(), [1.0, 1.0, 1.0]);
    }

    /// With three terms the order matters: the first projection changes which later dot
    /// products are negative.
    #[test]
    fn the_order_is_applied_as_given() {
        let g = vec![vec![1.0, 0.0], vec![-1.0, 1.0], vec![-1.0, -2.0]];
        let a = project(&g, &[vec![1, 2], vec![0, 2], vec![0, 1]]);
        let b = project(&g, &[vec![2, 1], vec![0, 2], vec![0, 1]]);
        assert_ne!(a, b);
        // Term 0 along (1, 2), then (2, 1) by hand: g0 = (1, 0); g0·g1 = -1 → (0.5, 0.5);
        // (0.5, 0.5)·g2 = -1.5 → + 1.5/5 (-1, -2) → (0.2, -0.1).
        let only_first = project(&g[..], &[vec![1, 2], vec![], vec![]]);
        let rest = [g[1].clone(), g[2].clone()];
        assert!((only_first[0] - (0.2 + rest[0][0] + rest[1][0])).abs() < 1e-12);
        assert!((only_first[1] - (-0.1 + rest[0][1] + rest[1][1])).abs() < 1e-12);
    }
}
