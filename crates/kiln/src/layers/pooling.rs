//! Pooling, channels last: max and average over windows (1-D and 2-D), and global pooling.
//!
//! Windows follow Keras: the stride defaults to the pool size, `same` padding pads as TensorFlow
//! does (extra element at the end), max pooling never picks a padded position, and average
//! pooling with `same` padding averages over the real positions of each window only.

use super::util::{
    check_positive, input_of_rank, mask_as, pad_axis, strided, window_axis, Padding,
};
use super::{CallContext, Layer};
use crate::error::{invalid, Error, Result};
use candle_core::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reduce {
    Max,
    Average,
}

/// A window pooling layer's configuration; sizes per spatial axis.
struct Pool {
    reduce: Reduce,
    pool: Vec<usize>,
    strides: Option<Vec<usize>>,
    padding: Padding,
    name: Option<String>,
}

impl Pool {
    fn new(reduce: Reduce, pool: Vec<usize>) -> Self {
        Self {
            reduce,
            pool,
            strides: None,
            padding: Padding::Valid,
            name: None,
        }
    }

    fn layer(&self) -> String {
        format!(
            "{}Pooling{}D",
            match self.reduce {
                Reduce::Max => "Max",
                Reduce::Average => "Average",
            },
            self.pool.len()
        )
    }

    /// Keras' class and config of the same pooling; Keras pools have no causal padding.
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        let class = match (self.reduce, self.pool.len()) {
            (Reduce::Max, 1) => "MaxPooling1D",
            (Reduce::Max, _) => "MaxPooling2D",
            (Reduce::Average, 1) => "AveragePooling1D",
            (Reduce::Average, _) => "AveragePooling2D",
        };
        if self.padding == Padding::Causal {
            return None;
        }
        Some((
            class,
            serde_json::json!({
                "pool_size": self.pool,
                "strides": self.strides(),
                "padding": self.padding,
                "data_format": "channels_last",
            }),
        ))
    }

    fn strides(&self) -> Vec<usize> {
        self.strides.clone().unwrap_or_else(|| self.pool.clone())
    }

    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let layer = self.layer();
        let rank = self.pool.len();
        let layout = if rank == 1 {
            "[steps, channels]"
        } else {
            "[height, width, channels]"
        };
        let shape = input_of_rank(&layer, input_shapes, rank + 1, layout)?;
        check_positive(&layer, "pool_size", &self.pool)?;
        check_positive(&layer, "strides", &self.strides())?;
        if self.padding == Padding::Causal {
            return Err(invalid(format!("{layer}: padding must be valid or same")));
        }
        let strides = self.strides();
        let mut out = Vec::with_capacity(rank + 1);
        for i in 0..rank {
            let axis = window_axis(shape[i], self.pool[i], strides[i], 1, self.padding)
                .ok_or_else(|| {
                    Error::Graph(format!(
                        "{layer}: a pool of {:?} does not fit an input of {shape:?} with `valid` \
                         padding",
                        self.pool
                    ))
                })?;
            out.push(axis.out);
        }
        out.push(shape[rank]);
        Ok(out)
    }

    fn call(&self, x: &Tensor) -> Result<Tensor> {
        let rank = self.pool.len();
        if x.rank() != rank + 2 {
            return Err(Error::Data(format!(
                "{} expects inputs of rank {}, got shape {:?}",
                self.layer(),
                rank + 2,
                x.dims()
            )));
        }
        let s = self.strides();
        // A 1-D pool is a 2-D one over a height of 1.
        let (x, pool, strides) = if rank == 1 {
            (x.unsqueeze(1)?, [1, self.pool[0]], [1, s[0]])
        } else {
            (x.clone(), [self.pool[0], self.pool[1]], [s[0], s[1]])
        };
        let paddings = [
            if rank == 1 {
                Padding::Valid
            } else {
                self.padding
            },
            self.padding,
        ];
        let neutral = match self.reduce {
            Reduce::Max => f64::NEG_INFINITY,
            Reduce::Average => 0.0,
        };
        let mut x = x;
        let mut axes = Vec::with_capacity(2);
        for a in 0..2 {
            let n = x.dims()[1 + a];
            let axis = window_axis(n, pool[a], strides[a], 1, paddings[a]).ok_or_else(|| {
                Error::Data(format!(
                    "{}: input {:?} is too short",
                    self.layer(),
                    x.dims()
                ))
            })?;
            x = pad_axis(&x, 1 + a, axis.before, axis.after, neutral)?;
            axes.push((n, axis));
        }
        let (oh, ow) = (axes[0].1.out, axes[1].1.out);
        #[cfg(test)]
        let fused = !tests::PLAIN.with(|p| p.get());
        #[cfg(not(test))]
        let fused = true;
        // The one-pass op skips the trailing positions no window reaches by itself; the plain
        // graph drops them first (a narrow, whose backward would pad the gradient with zeros).
        let direct = if fused && self.reduce == Reduce::Max {
            super::conv_kernel::max_pool2d(&x, super::conv_kernel::MaxPool2dOp { pool, strides })?
        } else {
            None
        };
        if direct.is_none() {
            for (a, out) in [oh, ow].into_iter().enumerate() {
                x = x.narrow(1 + a, 0, (out - 1) * strides[a] + pool[a])?;
            }
        }
        let y = if let Some(y) = direct {
            y
        } else if pool == strides {
            // Non-overlapping windows: split each axis into (windows, pool) and reduce the pool
            // axes. (candle's max_pool2d backward scales the gradient by 1/pool area, so it is
            // not used.)
            let (b, c) = (x.dims()[0], x.dims()[3]);
            let blocks = x.contiguous()?.reshape((b, oh, pool[0], ow, pool[1], c))?;
            match self.reduce {
                // Along the columns, then the rows: the first of the row-major window.
                Reduce::Max => max_to_first(&max_to_first(&blocks, 4)?, 2)?,
                Reduce::Average => blocks.mean(4)?.mean(2)?,
            }
        } else {
            // Overlapping windows: one strided view per window offset, reduced together.
            let mut views = Vec::with_capacity(pool[0] * pool[1]);
            for i in 0..pool[0] {
                let rows = strided(&x, 1, i, strides[0], oh)?;
                for j in 0..pool[1] {
                    views.push(strided(&rows, 2, j, strides[1], ow)?);
                }
            }
            let stacked = Tensor::stack(&views, 4)?;
            match self.reduce {
                Reduce::Max => max_to_first(&stacked, 4)?,
                Reduce::Average => (stacked.sum(4)? / (pool[0] * pool[1]) as f64)?,
            }
        };
        let y = if self.reduce == Reduce::Average && self.padding == Padding::Same {
            // Rescale each window from the full window size to its count of real positions.
            let count = |a: usize| -> Vec<f64> {
                let (n, axis) = axes[a];
                (0..axis.out)
                    .map(|o| {
                        (0..pool[a])
                            .filter(|k| {
                                let p = (o * strides[a] + k) as i64 - axis.before as i64;
                                p >= 0 && p < n as i64
                            })
                            .count() as f64
                    })
                    .collect()
            };
            let (ch, cw) = (count(0), count(1));
            let full = (pool[0] * pool[1]) as f64;
            let scale: Vec<f64> = ch
                .iter()
                .flat_map(|h| cw.iter().map(move |w| full / (h * w)))
                .collect();
            let scale = Tensor::from_vec(scale, (1, oh, ow, 1), y.device())?.to_dtype(y.dtype())?;
            y.broadcast_mul(&scale)?
        } else {
            y
        };
        Ok(if rank == 1 { y.squeeze(1)? } else { y })
    }
}

macro_rules! pool_layer {
    ($ty:ident, $kind:literal, $reduce:expr, $size:ty, $doc:literal) => {
        #[doc = $doc]
        pub struct $ty {
            pool: Pool,
        }

        impl $ty {
            /// A pool of `pool_size` positions per window, stride equal to the pool size, `valid`
            /// padding.
            pub fn new(pool_size: $size) -> Self {
                Self {
                    pool: Pool::new($reduce, to_vec(pool_size)),
                }
            }
            /// The step between windows (default: the pool size).
            pub fn strides(mut self, strides: $size) -> Self {
                self.pool.strides = Some(to_vec(strides));
                self
            }
            /// How the borders are treated (default `Valid`).
            pub fn padding(mut self, padding: Padding) -> Self {
                self.pool.padding = padding;
                self
            }
            /// The layer's name.
            pub fn with_name(mut self, name: impl Into<String>) -> Self {
                self.pool.name = Some(name.into());
                self
            }
            /// The old spelling of `with_name`.
            #[deprecated(since = "0.1.0", note = "use `with_name`, the name setter of every kiln builder (layers, losses, metrics)")]
            pub fn name(self, name: impl Into<String>) -> Self {
                self.with_name(name)
            }
        }

        impl Layer for $ty {
            fn samples_independent(&self) -> bool {
                true
            }
            fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
                self.pool.keras_config()
            }
            fn kind(&self) -> &'static str {
                $kind
            }
            fn given_name(&self) -> Option<&str> {
                self.pool.name.as_deref()
            }
            fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
                self.pool.output_shape(input_shapes)
            }
            fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
                self.pool.call(&inputs[0])
            }
            fn compute_mask(
                &self,
                _inputs: &[Tensor],
                _masks: &[Option<Tensor>],
            ) -> Result<Option<Tensor>> {
                Ok(None)
            }
        }
    };
}

/// A pool size for one axis or two.
trait PoolSize {
    fn into_vec(self) -> Vec<usize>;
}

impl PoolSize for usize {
    fn into_vec(self) -> Vec<usize> {
        vec![self]
    }
}

impl PoolSize for (usize, usize) {
    fn into_vec(self) -> Vec<usize> {
        vec![self.0, self.1]
    }
}

fn to_vec(size: impl PoolSize) -> Vec<usize> {
    size.into_vec()
}

pool_layer!(
    MaxPooling1D,
    "max_pooling1d",
    Reduce::Max,
    usize,
    "The maximum over windows of steps of `[steps, channels]` samples.\n\n\
     ```\n\
     use candle_core::{Device, Tensor};\n\
     use kiln::prelude::*;\n\
     let x = Input::new([5, 1]);\n\
     let y = MaxPooling1D::new(2).strides(1).apply(&x)?;\n\
     let model = Model::new(&[x], &[y])?;\n\
     let batch = Tensor::new(&[[[1f32], [3.], [2.], [0.], [4.]]], &Device::Cpu)?;\n\
     let out = model.predict(&[batch], 1)?[0].flatten_all()?.to_vec1::<f32>()?;\n\
     assert_eq!(out, vec![3., 3., 2., 4.]);\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);
pool_layer!(
    AveragePooling1D,
    "average_pooling1d",
    Reduce::Average,
    usize,
    "The mean over windows of steps of `[steps, channels]` samples; with `same` padding, over the \
     real steps of each window.\n\n\
     ```\n\
     use candle_core::{Device, Tensor};\n\
     use kiln::prelude::*;\n\
     let x = Input::new([5, 1]);\n\
     let y = AveragePooling1D::new(2).padding(Padding::Same).apply(&x)?;\n\
     let model = Model::new(&[x], &[y])?;\n\
     let batch = Tensor::new(&[[[1f32], [3.], [2.], [0.], [4.]]], &Device::Cpu)?;\n\
     let out = model.predict(&[batch], 1)?[0].flatten_all()?.to_vec1::<f32>()?;\n\
     assert_eq!(out, vec![2., 1., 4.]);\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);
pool_layer!(
    MaxPooling2D,
    "max_pooling2d",
    Reduce::Max,
    (usize, usize),
    "The maximum over `(height, width)` windows of `[height, width, channels]` samples.\n\n\
     ```\n\
     use kiln::prelude::*;\n\
     let x = Input::new([7, 8, 3]);\n\
     assert_eq!(MaxPooling2D::new((2, 2)).apply(&x)?.shape(), &[3, 4, 3]);\n\
     assert_eq!(MaxPooling2D::new((3, 3)).strides((2, 2)).padding(Padding::Same).apply(&x)?.shape(), &[4, 4, 3]);\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);
pool_layer!(
    AveragePooling2D,
    "average_pooling2d",
    Reduce::Average,
    (usize, usize),
    "The mean over `(height, width)` windows of `[height, width, channels]` samples; with `same` \
     padding, over the real positions of each window.\n\n\
     ```\n\
     use kiln::prelude::*;\n\
     let x = Input::new([6, 6, 2]);\n\
     assert_eq!(AveragePooling2D::new((2, 3)).apply(&x)?.shape(), &[3, 2, 2]);\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);

/// A global pooling layer's configuration.
struct Global {
    reduce: Reduce,
    rank: usize,
    keepdims: bool,
    name: Option<String>,
}

impl Global {
    fn layer(&self) -> String {
        format!(
            "Global{}Pooling{}D",
            match self.reduce {
                Reduce::Max => "Max",
                Reduce::Average => "Average",
            },
            self.rank
        )
    }

    /// Keras' class and config of the same global pooling.
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        let class = match (self.reduce, self.rank) {
            (Reduce::Max, 1) => "GlobalMaxPooling1D",
            (Reduce::Max, _) => "GlobalMaxPooling2D",
            (Reduce::Average, 1) => "GlobalAveragePooling1D",
            (Reduce::Average, _) => "GlobalAveragePooling2D",
        };
        Some((
            class,
            serde_json::json!({ "data_format": "channels_last", "keepdims": self.keepdims }),
        ))
    }

    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let layout = if self.rank == 1 {
            "[steps, channels]"
        } else {
            "[height, width, channels]"
        };
        let shape = input_of_rank(&self.layer(), input_shapes, self.rank + 1, layout)?;
        Ok(if self.keepdims {
            let mut out = vec![1; self.rank];
            out.push(shape[self.rank]);
            out
        } else {
            vec![shape[self.rank]]
        })
    }

    fn call(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        if x.rank() != self.rank + 2 {
            return Err(Error::Data(format!(
                "{} expects inputs of rank {}, got shape {:?}",
                self.layer(),
                self.rank + 2,
                x.dims()
            )));
        }
        let axes: Vec<usize> = (1..=self.rank).collect();
        let y = match (self.reduce, mask) {
            (Reduce::Average, Some(mask)) if self.rank == 1 => {
                // Keras: the mean over the unmasked steps only.
                let m = mask_as(mask, x.dtype())?.unsqueeze(2)?;
                let kept = x.broadcast_mul(&m)?.sum_keepdim(1)?;
                kept.broadcast_div(&m.sum_keepdim(1)?)?
            }
            (Reduce::Average, _) => x.mean_keepdim(axes.clone())?,
            (Reduce::Max, _) => max_splitting_ties(x, &axes)?,
        };
        Ok(if self.keepdims { y } else { y.flatten_from(1)? })
    }
}

/// The maximum of `x` over `dim`, whose gradient goes to the first entry that reaches it alone,
/// as a window's in Keras 3 on JAX (and TensorFlow) and the fused CPU op: candle's `max` gives
/// every tied entry the whole gradient, so a window of equal values passed it on several times.
/// The value is that entry itself.
fn max_to_first(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.detach().max_keepdim(dim)?;
    let ties = x.detach().broadcast_eq(&max)?;
    // Among the tied entries, the one with no tie before it (candle's cumsum is a product
    // that wants its axis last and contiguous).
    let last = x.rank() - 1;
    let running = ties
        .to_dtype(x.dtype())?
        .transpose(dim, last)?
        .contiguous()?
        .cumsum(last)?;
    let first = running.transpose(dim, last)?.eq(1.0)?.mul(&ties)?;
    // Selected rather than multiplied: the padding's -inf times 0 would be NaN.
    let picked = first.where_cond(x, &x.zeros_like()?)?.sum_keepdim(dim)?;
    // A window of NaN ties with nothing: it keeps candle's maximum (and no gradient).
    let found = first.max_keepdim(dim)?;
    Ok(found.where_cond(&picked, &max)?.squeeze(dim)?)
}

/// The maximum over `axes` (kept, of size 1), whose gradient is shared equally by the entries
/// that tie for it, as Keras' `ops.max` (JAX's and TensorFlow's reductions) shares it; candle's
/// `max` gives each tied entry the whole gradient, so padding steps that repeat one embedding
/// row would pass it on several times. The value is candle's maximum exactly: the gradient's
/// path adds `x - x` (zero) weighted by the share of each tied entry.
fn max_splitting_ties(x: &Tensor, axes: &[usize]) -> Result<Tensor> {
    let mut max = x.detach();
    for &a in axes {
        max = max.max_keepdim(a)?;
    }
    let ties = x.detach().broadcast_eq(&max)?.to_dtype(x.dtype())?;
    let mut count = ties.clone();
    for &a in axes {
        count = count.sum_keepdim(a)?;
    }
    let share = ties.broadcast_div(&count)?;
    let mut path = x.sub(&x.detach())?.mul(&share)?;
    for &a in axes {
        path = path.sum_keepdim(a)?;
    }
    Ok(max.add(&path)?)
}

macro_rules! global_layer {
    ($ty:ident, $kind:literal, $reduce:expr, $rank:literal, $doc:literal) => {
        #[doc = $doc]
        pub struct $ty {
            global: Global,
        }

        impl Default for $ty {
            fn default() -> Self {
                Self::new()
            }
        }

        impl $ty {
            /// Pools every position of each channel into one value.
            pub fn new() -> Self {
                Self {
                    global: Global {
                        reduce: $reduce,
                        rank: $rank,
                        keepdims: false,
                        name: None,
                    },
                }
            }
            /// Keeps the pooled axes with size 1 (default false).
            pub fn keepdims(mut self, keepdims: bool) -> Self {
                self.global.keepdims = keepdims;
                self
            }
            /// The layer's name.
            pub fn with_name(mut self, name: impl Into<String>) -> Self {
                self.global.name = Some(name.into());
                self
            }
            /// The old spelling of `with_name`.
            #[deprecated(since = "0.1.0", note = "use `with_name`, the name setter of every kiln builder (layers, losses, metrics)")]
            pub fn name(self, name: impl Into<String>) -> Self {
                self.with_name(name)
            }
        }

        impl Layer for $ty {
            fn samples_independent(&self) -> bool {
                true
            }
            fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
                self.global.keras_config()
            }
            fn kind(&self) -> &'static str {
                $kind
            }
            fn given_name(&self) -> Option<&str> {
                self.global.name.as_deref()
            }
            fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
                self.global.output_shape(input_shapes)
            }
            fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
                self.global.call(&inputs[0], None)
            }
            fn call_with_masks(
                &self,
                inputs: &[Tensor],
                masks: &[Option<Tensor>],
                _ctx: &mut CallContext,
            ) -> Result<Tensor> {
                self.global
                    .call(&inputs[0], masks.first().and_then(Option::as_ref))
            }
            fn takes_mask(&self) -> bool {
                // Keras' GlobalAveragePooling1D alone reads a mask (the mean of the kept steps).
                self.global.reduce == Reduce::Average && self.global.rank == 1
            }
            fn compute_mask(
                &self,
                _inputs: &[Tensor],
                _masks: &[Option<Tensor>],
            ) -> Result<Option<Tensor>> {
                // The time axis is gone, and the mask with it.
                Ok(None)
            }
        }
    };
}

global_layer!(
    GlobalAveragePooling1D,
    "global_average_pooling1d",
    Reduce::Average,
    1,
    "The mean over steps of `[steps, channels]` samples; with a mask (from `Embedding(mask_zero)` \
     or `Masking`), over the unmasked steps only, as Keras.\n\n\
     ```\n\
     use candle_core::{Device, Tensor};\n\
     use kiln::prelude::*;\n\
     let ids = Input::new([3]);\n\
     let e = Embedding::new(5, 2).mask_zero(true).with_name(\"emb\").apply(&ids)?;\n\
     let y = GlobalAveragePooling1D::new().apply(&e)?;\n\
     let model = Model::new(&[ids], &[y])?;\n\
     let out = model.predict(&[Tensor::new(&[[2f32, 0., 0.]], &Device::Cpu)?], 1)?;\n\
     let table = model.weight(\"emb/embeddings\")?.var.as_tensor().to_vec2::<f32>()?;\n\
     assert_eq!(out[0].to_vec2::<f32>()?[0], table[2]); // the padding steps are left out\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);
global_layer!(
    GlobalAveragePooling2D,
    "global_average_pooling2d",
    Reduce::Average,
    2,
    "The mean over height and width of `[height, width, channels]` samples.\n\n\
     ```\n\
     use kiln::prelude::*;\n\
     let x = Input::new([4, 4, 3]);\n\
     assert_eq!(GlobalAveragePooling2D::new().apply(&x)?.shape(), &[3]);\n\
     assert_eq!(GlobalAveragePooling2D::new().keepdims(true).apply(&x)?.shape(), &[1, 1, 3]);\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);
global_layer!(
    GlobalMaxPooling1D,
    "global_max_pooling1d",
    Reduce::Max,
    1,
    "The maximum over steps of `[steps, channels]` samples (masks are not used, as in Keras).\n\n\
     ```\n\
     use kiln::prelude::*;\n\
     let x = Input::new([6, 2]);\n\
     assert_eq!(GlobalMaxPooling1D::new().apply(&x)?.shape(), &[2]);\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);
global_layer!(
    GlobalMaxPooling2D,
    "global_max_pooling2d",
    Reduce::Max,
    2,
    "The maximum over height and width of `[height, width, channels]` samples.\n\n\
     ```\n\
     use kiln::prelude::*;\n\
     let x = Input::new([4, 5, 3]);\n\
     assert_eq!(GlobalMaxPooling2D::new().apply(&x)?.shape(), &[3]);\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::util::fused_check::{max_diff, weighted_sum_grads};
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    thread_local! {
        /// Set to make max pooling take the plain candle graph.
        pub(super) static PLAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Max pooling through the one-pass kernel and through the plain graph: outputs and input
    /// gradients agree (random inputs, so no ties), for odd sizes, strides and both paddings.
    #[test]
    fn one_pass_max_pooling_matches_the_plain_graph() {
        let layers: Vec<(Box<dyn Layer>, Vec<usize>)> = vec![
            (Box::new(MaxPooling2D::new((2, 2))), vec![1, 2, 2, 1]),
            (Box::new(MaxPooling2D::new((2, 2))), vec![3, 7, 9, 5]),
            (
                Box::new(MaxPooling2D::new((3, 2)).padding(Padding::Same)),
                vec![2, 8, 5, 17],
            ),
            (
                Box::new(MaxPooling2D::new((3, 3)).strides((1, 2))),
                vec![2, 9, 10, 3],
            ),
            (
                Box::new(
                    MaxPooling2D::new((2, 3))
                        .strides((2, 2))
                        .padding(Padding::Same),
                ),
                vec![1, 7, 7, 2],
            ),
            (Box::new(MaxPooling1D::new(3).strides(2)), vec![2, 11, 4]),
            // Above the threading threshold: the samples split across threads.
            (
                Box::new(MaxPooling2D::new((2, 2)).strides((2, 1))),
                vec![9, 20, 21, 24],
            ),
        ];
        for dtype in [DType::F64, DType::F32] {
            for (i, (layer, shape)) in layers.iter().enumerate() {
                let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
                let n: usize = shape.iter().product();
                let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>()).collect();
                let x = Var::from_tensor(
                    &Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                let run = |plain: bool| {
                    PLAIN.with(|p| p.set(plain));
                    let mut ctx = CallContext::new(true, crate::random::SampleStreams::new(0, 0));
                    let out = layer.call(&[x.as_tensor().clone()], &mut ctx).unwrap();
                    PLAIN.with(|p| p.set(false));
                    out
                };
                let (fast, plain) = (run(false), run(true));
                assert_eq!(fast.dims(), plain.dims());
                assert_eq!(max_diff(&fast, &plain), 0.0, "{shape:?}");
                let w = Tensor::rand(0f32, 1f32, fast.dims(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let gf = weighted_sum_grads(fast, &w);
                let gp = weighted_sum_grads(plain, &w);
                let d = max_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap());
                assert!(d < 1e-6, "{shape:?}: {d}");
            }
        }
    }

    /// Ties, NaN and signed zeros: each window's output is its first element that no later one
    /// exceeds, and that element alone gets the window's gradient (TensorFlow's rule), checked
    /// against a plain loop over windows, with overlapping windows (stride 1) adding up.
    #[test]
    fn max_pooling_gives_a_tied_window_gradient_to_its_first_maximum() {
        let (h, w, c) = (5, 6, 19);
        let values = [0.0, 1.0, 2.0, -0.0, f64::NAN, 2.0, 1.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let v: Vec<f64> = (0..2 * h * w * c)
            .map(|_| values[rng.random_range(0..values.len())])
            .collect();
        let cases = [([2, 2], [2, 2]), ([3, 2], [1, 1]), ([2, 3], [1, 2])];
        for ((pool, strides), plain) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            // The plain graph's NaN is candle's maximum's: there, ties and zeros are checked.
            let v: Vec<f64> = match plain {
                true => v
                    .iter()
                    .map(|&e| if e.is_nan() { 1.5 } else { e })
                    .collect(),
                false => v.clone(),
            };
            let x =
                Var::from_tensor(&Tensor::from_vec(v.clone(), (2, h, w, c), &Device::Cpu).unwrap())
                    .unwrap();
            let layer = MaxPooling2D::new((pool[0], pool[1])).strides((strides[0], strides[1]));
            let mut ctx = CallContext::new(true, crate::random::SampleStreams::new(0, 0));
            PLAIN.with(|p| p.set(plain));
            let y = layer.call(&[x.as_tensor().clone()], &mut ctx);
            PLAIN.with(|p| p.set(false));
            let y = y.unwrap();
            let (oh, ow) = (
                (h - pool[0]) / strides[0] + 1,
                (w - pool[1]) / strides[1] + 1,
            );
            let g: Vec<f64> = (0..2 * oh * ow * c).map(|i| 1.0 + i as f64).collect();
            let gt = Tensor::from_vec(g.clone(), (2, oh, ow, c), &Device::Cpu).unwrap();
            let dx = (y.clone() * gt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .get(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let mut want_dx = vec![0.0; v.len()];
            let at = |n: usize, i: usize, j: usize, ch: usize| ((n * h + i) * w + j) * c + ch;
            for n in 0..2 {
                for (i, j, ch) in positions(oh, ow, c) {
                    let mut best = at(n, i * strides[0], j * strides[1], ch);
                    for p in 0..pool[0] {
                        for q in 0..pool[1] {
                            let k = at(n, i * strides[0] + p, j * strides[1] + q, ch);
                            if v[k] > v[best] {
                                best = k;
                            }
                        }
                    }
                    let o = ((n * oh + i) * ow + j) * c + ch;
                    // The fused op keeps the sign of a zero; the plain graph's sum may not.
                    match plain {
                        false => assert_eq!(y[o].to_bits(), v[best].to_bits(), "{pool:?} {o}"),
                        true => assert_eq!(y[o], v[best], "{pool:?} output {o}"),
                    }
                    want_dx[best] += g[o];
                }
            }
            assert_eq!(dx, want_dx, "{pool:?} {strides:?} plain {plain}");
        }
    }

    /// Global max pooling gives the maximum, and entries that tie for it share its gradient
    /// equally (JAX's `max`: 1/2 each for two ties, 1/3 for three), over one axis or two.
    #[test]
    fn global_max_shares_the_gradient_of_ties() {
        let d = Device::Cpu;
        let x = Var::new(&[[[1f32, 2.], [1., 0.], [0., 2.]]], &d).unwrap();
        let y = max_splitting_ties(x.as_tensor(), &[1]).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [1., 2.]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(g, [[[0.5, 0.5], [0.5, 0.], [0., 0.5]]]);
        let img = Var::new(&[[[[3f32], [3.]], [[3.], [1.]]]], &d).unwrap();
        let y = max_splitting_ties(img.as_tensor(), &[1, 2]).unwrap();
        let g = (y * 6.0).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(img.as_tensor()).unwrap().flatten_all().unwrap();
        assert_eq!(g.to_vec1::<f32>().unwrap(), [2., 2., 2., 0.]);
    }

    /// Every `(i, j, channel)` of an `oh × ow × c` output.
    fn positions(oh: usize, ow: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..oh).flat_map(move |i| (0..ow).flat_map(move |j| (0..c).map(move |ch| (i, j, ch))))
    }
}
