//! Per-sample random streams: the randomness of a training step (dropout masks, an attack's
//! random start) drawn so that it does not depend on how the batch is split.
//!
//! Every value is keyed by (run seed, global step, forward pass of the step, layer, draw) and
//! by the sample's index in the GLOBAL batch: each sample reads the words of its own ChaCha8
//! stream (rand_chacha's counter-based generator: the key selects the cipher key, the sample the
//! stream, the element the word). A sample therefore gets the same mask on any rank, in any
//! shard of any size, and in a resumed run (the key holds the step, not a generator's state),
//! and the mask of a `[128, 512]` tensor costs one ChaCha8 word per element, less than the
//! one ChaCha12 `f64` per element a shared `StdRng` drew before.

use crate::error::{invalid, Result};
use candle_core::{DType, Device, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The randomness of one training step: the run's seed and the step's index, and a counter of
/// the step's forward passes (the clean pass, an attack's passes, the adversarial pass), each
/// of which draws its own masks.
#[derive(Clone, Debug)]
pub(crate) struct StepRandom {
    seed: u64,
    step: u64,
    passes: u64,
}

impl StepRandom {
    /// Step `step` of a run seeded with `seed`.
    pub(crate) fn new(seed: u64, step: u64) -> Self {
        Self {
            seed,
            step,
            passes: 0,
        }
    }

    /// The key of the step's next forward pass.
    pub(crate) fn next_pass(&mut self) -> PassRandom {
        self.passes += 1;
        PassRandom {
            seed: self.seed,
            step: self.step,
            pass: self.passes - 1,
        }
    }

    /// One value for the step's choices that are not per sample (PCGrad's projection order).
    pub(crate) fn step_seed(&self) -> u64 {
        let mut rng = ChaCha8Rng::from_seed(key_bytes([self.seed, self.step, u64::MAX, 0]));
        rng.next_u64()
    }
}

/// The key of one forward pass of a step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PassRandom {
    seed: u64,
    step: u64,
    pass: u64,
}

impl PassRandom {
    /// The streams of the node `node` (its place in the model's graph, which tells two calls
    /// of a shared layer apart) of layer `name`, for a shard whose first sample is sample
    /// `first_row` of the global batch.
    pub(crate) fn streams(&self, name: &str, node: usize, first_row: usize) -> SampleStreams {
        SampleStreams {
            key: [self.seed, self.step, self.pass, identity(name, node)],
            first_row: first_row as u64,
        }
    }
}

/// FNV-1a over the name and the node: the layer's part of the key.
fn identity(name: &str, node: usize) -> u64 {
    let bytes = name.bytes().chain((node as u64).to_le_bytes());
    bytes.fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn key_bytes(words: [u64; 4]) -> [u8; 32] {
    let mut key = [0u8; 32];
    for (chunk, w) in key.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    key
}

/// What a layer draws from while it runs ([`crate::layers::CallContext::random`]): one stream
/// per sample of the batch, keyed by the sample's index in the global batch, so that a sample's
/// values do not depend on the rank or shard that holds it. A layer that draws several tensors
/// in one call gives each its own `draw` number.
///
/// ```
/// use kiln::candle::{DType, Device};
/// use kiln::random::SampleStreams;
/// // Samples 0..10 at once, or as shards 0..3 and 3..10: the same masks.
/// let whole = SampleStreams::new(7, 0).dropout_mask(0, &[10, 4], 0.5, DType::F32, &Device::Cpu)?;
/// let head = SampleStreams::new(7, 0).dropout_mask(0, &[3, 4], 0.5, DType::F32, &Device::Cpu)?;
/// let tail = SampleStreams::new(7, 3).dropout_mask(0, &[7, 4], 0.5, DType::F32, &Device::Cpu)?;
/// let split = kiln::candle::Tensor::cat(&[head, tail], 0)?;
/// assert_eq!(whole.to_vec2::<f32>()?, split.to_vec2::<f32>()?);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct SampleStreams {
    /// (seed, step, pass, layer identity).
    key: [u64; 4],
    /// The global batch index of the shard's first sample.
    first_row: u64,
}

impl SampleStreams {
    /// Streams keyed by `seed` alone (outside a training step: a layer called on its own, a
    /// test), for a batch whose first sample is sample `first_row` of the global batch.
    pub fn new(seed: u64, first_row: usize) -> Self {
        Self {
            key: [seed, 0, 0, 0],
            first_row: first_row as u64,
        }
    }

    /// The global batch index of this batch's first sample (0 in one process).
    pub fn first_row(&self) -> usize {
        self.first_row as usize
    }

    /// Fills `out`, `rows` samples of `out.len() / rows` values each, sample by sample from
    /// its own stream.
    fn fill<T>(
        &self,
        draw: u32,
        rows: usize,
        out: &mut [T],
        mut value: impl FnMut(&mut ChaCha8Rng) -> T,
    ) {
        let per_row = out.len() / rows.max(1);
        let mut key = self.key;
        key[2] = key[2].wrapping_shl(32) | u64::from(draw);
        let key = key_bytes(key);
        for (r, row) in out.chunks_exact_mut(per_row.max(1)).enumerate() {
            // A fresh generator starts at word 0 (and its empty buffer makes `set_stream` free).
            let mut rng = ChaCha8Rng::from_seed(key);
            rng.set_stream(self.first_row + r as u64);
            for v in row {
                *v = value(&mut rng);
            }
        }
    }

    /// The mask of an inverted dropout of `rate` over a batch of `shape` (batch first): each
    /// value is kept with probability `1 - rate` (an element's 32-bit word below
    /// `(1 - rate) · 2³²`) and then worth `1 / (1 - rate)`, or dropped (0).
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] for a rate outside `[0, 1)` or a shape without a
    /// batch axis; a tensor error.
    pub fn dropout_mask(
        &self,
        draw: u32,
        shape: &[usize],
        rate: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if !(0.0..1.0).contains(&rate) {
            return Err(invalid(format!(
                "dropout rate must be in [0, 1), got {rate}"
            )));
        }
        let rows = batch_of(shape)?;
        let keep = 1.0 - rate;
        let threshold = (keep * 4_294_967_296.0).round() as u64;
        let n: usize = shape.iter().product();
        let mask = match dtype {
            DType::F64 => {
                let mut v = vec![0f64; n];
                let scale = 1.0 / keep;
                self.fill(draw, rows, &mut v, |g| kept(g, threshold, scale, 0.0));
                Tensor::from_vec(v, shape, device)?
            }
            _ => {
                let mut v = vec![0f32; n];
                let scale = (1.0 / keep) as f32;
                self.fill(draw, rows, &mut v, |g| kept(g, threshold, scale, 0.0));
                Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
            }
        };
        Ok(mask)
    }

    /// Values uniform in `[low, high)` over a batch of `shape` (batch first), from 53 bits of
    /// two words of the sample's stream each.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] for a shape without a batch axis; a tensor error.
    pub fn uniform(
        &self,
        draw: u32,
        shape: &[usize],
        low: f64,
        high: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let rows = batch_of(shape)?;
        let mut v = vec![0f64; shape.iter().product()];
        self.fill(draw, rows, &mut v, |g| {
            low + (high - low) * ((g.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64))
        });
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
    }
}

#[inline]
fn kept<T>(g: &mut ChaCha8Rng, threshold: u64, scale: T, zero: T) -> T {
    if u64::from(g.next_u32()) < threshold {
        scale
    } else {
        zero
    }
}

fn batch_of(shape: &[usize]) -> Result<usize> {
    shape
        .first()
        .copied()
        .ok_or_else(|| invalid("per-sample random values need a batch axis: got a scalar shape"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &SampleStreams, draw: u32, rows: usize, cols: usize, rate: f64) -> Vec<Vec<bool>> {
        let m = s
            .dropout_mask(draw, &[rows, cols], rate, DType::F32, &Device::Cpu)
            .unwrap();
        m.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|v| v != 0.0).collect())
            .collect()
    }

    fn pass(seed: u64, step: u64, pass_number: u64) -> PassRandom {
        let mut r = StepRandom::new(seed, step);
        for _ in 0..pass_number {
            r.next_pass();
        }
        r.next_pass()
    }

    /// Any split of a batch into shards, each with its first global row, draws the very masks
    /// of the whole batch, in f32 and f64.
    #[test]
    fn shards_of_any_size_draw_the_masks_of_the_whole_batch() {
        let p = pass(11, 42, 1);
        for dtype in [DType::F32, DType::F64] {
            let whole = p
                .streams("dropout", 3, 0)
                .dropout_mask(0, &[23, 17], 0.4, dtype, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            for cuts in [
                vec![0, 23],
                vec![0, 12, 23],
                vec![0, 8, 16, 23],
                vec![0, 1, 2, 22, 23],
            ] {
                let mut rows = Vec::new();
                for w in cuts.windows(2) {
                    let part = p
                        .streams("dropout", 3, w[0])
                        .dropout_mask(0, &[w[1] - w[0], 17], 0.4, dtype, &Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_vec2::<f64>()
                        .unwrap();
                    rows.extend(part);
                }
                assert_eq!(rows, whole, "{dtype:?} {cuts:?}");
            }
            let scale = 1.0 / 0.6;
            let scale = if dtype == DType::F32 {
                f64::from(scale as f32)
            } else {
                scale
            };
            assert!(whole.iter().flatten().all(|&v| v == 0.0 || v == scale));
        }
    }

    /// The share kept is 1 - rate within 5 standard deviations, at several rates.
    #[test]
    fn the_keep_rate_is_one_minus_the_rate() {
        let s = pass(5, 0, 0).streams("d", 0, 0);
        for rate in [0.1, 0.3, 0.5, 0.9] {
            let (rows, cols) = (400, 500);
            let kept = bits(&s, 0, rows, cols, rate)
                .into_iter()
                .flatten()
                .filter(|&k| k)
                .count();
            let n = (rows * cols) as f64;
            let p = 1.0 - rate;
            let sd = (p * (1.0 - p) / n).sqrt();
            let share = kept as f64 / n;
            assert!(
                (share - p).abs() < 5.0 * sd,
                "rate {rate}: kept {share}, sd {sd}"
            );
        }
    }

    /// The 2×2 chi-square statistic (one degree of freedom) of two equally long bit sequences.
    fn chi_square(a: &[bool], b: &[bool]) -> f64 {
        let n = a.len() as f64;
        let mut table = [[0f64; 2]; 2];
        for (&x, &y) in a.iter().zip(b) {
            table[usize::from(x)][usize::from(y)] += 1.0;
        }
        let row = [table[0][0] + table[0][1], table[1][0] + table[1][1]];
        let col = [table[0][0] + table[1][0], table[0][1] + table[1][1]];
        let mut chi = 0.0;
        for i in 0..2 {
            for j in 0..2 {
                let expected = row[i] * col[j] / n;
                chi += (table[i][j] - expected).powi(2) / expected;
            }
        }
        chi
    }

    /// Masks of neighbouring rows, elements, steps, passes, layers, nodes of one layer, draws
    /// and seeds are independent: each pair's 2×2 chi-square statistic stays below 15.1 (the
    /// 0.01 % point of chi-square with one degree of freedom; deterministic keys, no flakes).
    #[test]
    fn masks_are_independent_across_rows_elements_steps_and_layers() {
        let (rows, cols, rate) = (200, 250, 0.5);
        let flat = |s: SampleStreams, draw: u32| -> Vec<bool> {
            bits(&s, draw, rows, cols, rate).concat()
        };
        let base = pass(1, 10, 0).streams("dense", 2, 0);
        let reference = flat(base, 0);
        let shifted: Vec<bool> = {
            // Row r against row r + 1, element e against element e + 1.
            let m = bits(&base, 0, rows + 1, cols + 1, rate);
            let down: Vec<bool> = m[1..].iter().flat_map(|r| r[..cols].to_vec()).collect();
            let right: Vec<bool> = m[..rows].iter().flat_map(|r| r[1..].to_vec()).collect();
            let same: Vec<bool> = m[..rows].iter().flat_map(|r| r[..cols].to_vec()).collect();
            assert!(chi_square(&same, &down) < 15.1, "rows");
            assert!(chi_square(&same, &right) < 15.1, "elements");
            same
        };
        assert_eq!(shifted, reference);
        let others = [
            ("step", flat(pass(1, 11, 0).streams("dense", 2, 0), 0)),
            ("pass", flat(pass(1, 10, 1).streams("dense", 2, 0), 0)),
            ("layer", flat(pass(1, 10, 0).streams("dense_1", 2, 0), 0)),
            ("node", flat(pass(1, 10, 0).streams("dense", 3, 0), 0)),
            ("draw", flat(base, 1)),
            ("seed", flat(pass(2, 10, 0).streams("dense", 2, 0), 0)),
        ];
        for (what, other) in &others {
            let chi = chi_square(&reference, other);
            assert!(chi < 15.1, "{what}: chi-square {chi}");
            assert_ne!(&reference, other, "{what}");
        }
    }

    /// Uniform values: 20 equal bins over [-1, 1) pass a chi-square test (19 degrees of
    /// freedom, below 43.8, the 0.1 % point), and every value is in range.
    #[test]
    fn uniform_values_are_uniform_in_range() {
        let s = pass(3, 1, 0).streams("attack", 0, 0);
        let v = s
            .uniform(0, &[100, 1000], -1.0, 1.0, DType::F64, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mut bins = [0f64; 20];
        for x in &v {
            bins[((x + 1.0) * 10.0) as usize] += 1.0;
        }
        let expected = v.len() as f64 / 20.0;
        let chi: f64 = bins.iter().map(|b| (b - expected).powi(2) / expected).sum();
        assert!(chi < 43.8, "chi-square {chi}");
    }

    proptest::proptest! {
        /// Any seed, step, layer, batch, cut and rate: the two shards' masks are the whole
        /// batch's, and uniform values too.
        #[test]
        fn any_split_draws_the_whole_batch(
            seed: u64,
            step in 0u64..1_000_000,
            node in 0usize..50,
            rows in 1usize..40,
            cols in 1usize..20,
            cut_share in 0.0f64..=1.0,
            rate in 0.0f64..0.99,
        ) {
            let cut = ((rows as f64) * cut_share) as usize;
            let p = pass(seed, step, 0);
            let at = |first: usize, n: usize| {
                let s = p.streams("layer", node, first);
                let m = s.dropout_mask(0, &[n, cols], rate, DType::F32, &Device::Cpu).unwrap();
                let u = s.uniform(1, &[n, cols], -2.0, 3.0, DType::F64, &Device::Cpu).unwrap();
                (m.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                 u.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            };
            let whole = at(0, rows);
            let (mut m, mut u) = at(0, cut);
            let tail = at(cut, rows - cut);
            m.extend(tail.0);
            u.extend(tail.1);
            proptest::prop_assert_eq!(&m, &whole.0);
            proptest::prop_assert_eq!(&u, &whole.1);
            proptest::prop_assert!(whole.1.iter().all(|v| (-2.0..3.0).contains(v)));
        }
    }

    #[test]
    fn bad_rates_and_shapes_are_errors() {
        let s = SampleStreams::new(0, 0);
        let e = s
            .dropout_mask(0, &[2, 2], 1.0, DType::F32, &Device::Cpu)
            .unwrap_err();
        assert!(e.to_string().contains("[0, 1)"), "{e}");
        let e = s
            .uniform(0, &[], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap_err();
        assert!(e.to_string().contains("batch axis"), "{e}");
    }

    /// The mask of a [128, 512] f32 tensor against the per-element `StdRng` draws it replaces
    /// (run with `--ignored --nocapture`; interleaved rounds, medians).
    #[test]
    #[ignore]
    fn mask_speed_against_a_shared_std_rng() {
        use rand::Rng;
        use std::time::Instant;
        let (rows, cols, keep) = (128usize, 512usize, 0.7f64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for round in 0..200u64 {
            let t = Instant::now();
            let scale = (1.0 / keep) as f32;
            let mask: Vec<f32> = (0..rows * cols)
                .map(|_| {
                    if rng.random::<f64>() < keep {
                        scale
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (rows, cols), &Device::Cpu).unwrap();
            std::hint::black_box(mask);
            old.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            let s = pass(1, round, 0).streams("dropout", 1, 0);
            let mask = s
                .dropout_mask(0, &[rows, cols], 1.0 - keep, DType::F32, &Device::Cpu)
                .unwrap();
            std::hint::black_box(mask);
            new.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        eprintln!(
            "[128, 512] mask: StdRng per element {:.1} us, per-sample ChaCha8 streams {:.1} us (medians of 200)",
            median(&mut old),
            median(&mut new)
        );
    }
}
