//! Layers that merge several inputs: Add, Multiply, Concatenate.
//!
//! Masks follow Keras: Add and Multiply keep the union (logical or) of their inputs' masks when
//! every input has one and drop it otherwise; Concatenate joins the masks along its axis, or,
//! along the feature axis, keeps a position when any input keeps it.

use super::{CallContext, Layer};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

fn check_same_shapes(layer: &str, shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
    if shapes.len() < 2 {
        return Err(Error::Graph(format!(
            "{layer} merges at least two inputs, got {}",
            shapes.len()
        )));
    }
    if shapes.iter().any(|s| s != &shapes[0]) {
        return Err(Error::Graph(format!(
            "{layer} needs inputs of the same shape, got {shapes:?}"
        )));
    }
    Ok(shapes[0].clone())
}

/// The logical or of the masks when every input has one, as Keras' elementwise merges.
fn or_masks(masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
    if masks.is_empty() || masks.iter().any(Option::is_none) {
        return Ok(None);
    }
    let mut out = masks[0].clone().expect("checked").ne(0.0)?;
    for m in &masks[1..] {
        out = out.maximum(&m.as_ref().expect("checked").ne(0.0)?)?;
    }
    Ok(Some(out))
}

/// Keras' masked product: masked entries count as 1; with a mask on every input, entries masked
/// everywhere are set to 0.
fn multiply_masked(inputs: &[Tensor], masks: &[Option<Tensor>]) -> Result<Tensor> {
    let all_masked = masks.len() == inputs.len() && masks.iter().all(Option::is_some);
    let mut out: Option<Tensor> = None;
    let mut union: Option<Tensor> = None;
    for (x, m) in inputs
        .iter()
        .zip(masks.iter().chain(std::iter::repeat(&None)))
    {
        let x = match m {
            Some(m) => {
                let keep = m
                    .ne(0.0)?
                    .unsqueeze(m.rank())?
                    .broadcast_as(x.shape())?
                    .contiguous()?;
                union = Some(match union.take() {
                    Some(u) => u.maximum(&keep)?,
                    None => keep.clone(),
                });
                keep.where_cond(x, &x.ones_like()?)?
            }
            None => x.clone(),
        };
        out = Some(match out.take() {
            Some(acc) => acc.mul(&x)?,
            None => x,
        });
    }
    let out = out.ok_or_else(|| Error::Graph("Multiply needs inputs".into()))?;
    match (all_masked, union) {
        (true, Some(u)) => Ok(u.where_cond(&out, &out.zeros_like()?)?),
        _ => Ok(out),
    }
}

macro_rules! elementwise_merge {
    ($ty:ident, $kind:literal, $layer:literal, $op:ident, $masked:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Default)]
        pub struct $ty {
            name: Option<String>,
        }

        impl $ty {
            /// The layer, to apply to two or more tensors of the same shape with `apply_many`.
            pub fn new() -> Self {
                Self::default()
            }
            /// The layer's name.
            pub fn with_name(mut self, name: impl Into<String>) -> Self {
                self.name = Some(name.into());
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
                Some(($layer, serde_json::json!({})))
            }
            fn kind(&self) -> &'static str {
                $kind
            }
            fn given_name(&self) -> Option<&str> {
                self.name.as_deref()
            }
            fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
                check_same_shapes($layer, input_shapes)
            }
            fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
                let mut out = inputs[0].clone();
                for x in &inputs[1..] {
                    out = out.$op(x)?;
                }
                Ok(out)
            }
            fn call_with_masks(
                &self,
                inputs: &[Tensor],
                masks: &[Option<Tensor>],
                ctx: &mut CallContext,
            ) -> Result<Tensor> {
                match $masked {
                    Some(f) => f(inputs, masks),
                    None => self.call(inputs, ctx),
                }
            }
            fn compute_mask(
                &self,
                _inputs: &[Tensor],
                masks: &[Option<Tensor>],
            ) -> Result<Option<Tensor>> {
                or_masks(masks)
            }
        }
    };
}

elementwise_merge!(
    Add,
    "add",
    "Add",
    add,
    None::<fn(&[Tensor], &[Option<Tensor>]) -> Result<Tensor>>,
    "The elementwise sum of its inputs (a residual connection).\n\n\
     ```\n\
     use candle_core::{Device, Tensor};\n\
     use kiln::prelude::*;\n\
     let (a, b) = (Input::new([2]), Input::new([2]));\n\
     let y = Add::new().apply_many(&[&a, &b])?;\n\
     let model = Model::new(&[a, b], &[y])?;\n\
     let one = Tensor::new(&[[1f32, 2.]], &Device::Cpu)?;\n\
     let two = Tensor::new(&[[10f32, 20.]], &Device::Cpu)?;\n\
     assert_eq!(model.predict(&[one, two], 1)?[0].to_vec2::<f32>()?, vec![vec![11., 22.]]);\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);
elementwise_merge!(
    Multiply,
    "multiply",
    "Multiply",
    mul,
    Some(multiply_masked),
    "The elementwise product of its inputs (gating). As in Keras, a masked entry of an input counts \
     as 1 (it does not zero the product), and when every input has a mask, the entries masked in \
     all of them are 0.\n\n\
     ```\n\
     use candle_core::{Device, Tensor};\n\
     use kiln::prelude::*;\n\
     let (a, b) = (Input::new([2]), Input::new([2]));\n\
     let y = Multiply::new().apply_many(&[&a, &b])?;\n\
     let model = Model::new(&[a, b], &[y])?;\n\
     let one = Tensor::new(&[[1f32, 2.]], &Device::Cpu)?;\n\
     let two = Tensor::new(&[[10f32, 20.]], &Device::Cpu)?;\n\
     assert_eq!(model.predict(&[one, two], 1)?[0].to_vec2::<f32>()?, vec![vec![10., 40.]]);\n\
     # Ok::<(), kiln::Error>(())\n\
     ```"
);

/// Joins its inputs along an axis (default the last one); the other axes must agree.
///
/// ```
/// use kiln::prelude::*;
/// let (a, b) = (Input::new([5, 3]), Input::new([5, 2]));
/// assert_eq!(Concatenate::new().apply_many(&[&a, &b])?.shape(), &[5, 5]);
/// let c = Input::new([4, 3]);
/// assert_eq!(Concatenate::new().axis(1).apply_many(&[&a, &c])?.shape(), &[9, 3]);
/// assert!(Concatenate::new().apply_many(&[&a, &c]).is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Concatenate {
    axis: isize,
    name: Option<String>,
}

impl Default for Concatenate {
    fn default() -> Self {
        Self::new()
    }
}

impl Concatenate {
    /// Joins along the last axis.
    pub fn new() -> Self {
        Self {
            axis: -1,
            name: None,
        }
    }
    /// The axis to join along, counting the batch axis as 0 (as Keras); negative counts from the
    /// end (default -1).
    pub fn axis(mut self, axis: isize) -> Self {
        self.axis = axis;
        self
    }
    /// The layer's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The old spelling of `with_name`.
    #[deprecated(
        since = "0.1.0",
        note = "use `with_name`, the name setter of every kiln builder (layers, losses, metrics)"
    )]
    pub fn name(self, name: impl Into<String>) -> Self {
        self.with_name(name)
    }

    /// The axis as an index into the batched tensor of rank `rank`.
    fn resolve(&self, rank: usize) -> Result<usize> {
        let a = if self.axis < 0 {
            rank as isize + self.axis
        } else {
            self.axis
        };
        if a < 1 || a >= rank as isize {
            return Err(Error::Graph(format!(
                "Concatenate: axis {} is not a non-batch axis of inputs of rank {rank} (batch \
                 included)",
                self.axis
            )));
        }
        Ok(a as usize)
    }
}

impl Layer for Concatenate {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some(("Concatenate", serde_json::json!({ "axis": self.axis })))
    }
    fn kind(&self) -> &'static str {
        "concatenate"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        if input_shapes.len() < 2 {
            return Err(Error::Graph(format!(
                "Concatenate merges at least two inputs, got {}",
                input_shapes.len()
            )));
        }
        let rank = input_shapes[0].len() + 1;
        let axis = self.resolve(rank)? - 1;
        let mut out = input_shapes[0].clone();
        for s in &input_shapes[1..] {
            let agree = s.len() == out.len()
                && s.iter()
                    .zip(&out)
                    .enumerate()
                    .all(|(i, (a, b))| i == axis || a == b);
            if !agree {
                return Err(Error::Graph(format!(
                    "Concatenate along axis {}: every other axis must agree, got {input_shapes:?}",
                    self.axis
                )));
            }
            out[axis] += s[axis];
        }
        Ok(out)
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let axis = self.resolve(inputs[0].rank())?;
        Ok(Tensor::cat(inputs, axis)?)
    }
    fn compute_mask(&self, inputs: &[Tensor], masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        if masks.iter().all(Option::is_none) {
            return Ok(None);
        }
        let rank = inputs[0].rank();
        let axis = self.resolve(rank)?;
        // Each input's mask over all its axes but the last (missing masks keep everything).
        let full: Vec<Tensor> = inputs
            .iter()
            .zip(masks)
            .map(|(x, m)| -> Result<Tensor> {
                let shape = &x.dims()[..rank - 1];
                match m {
                    Some(m) => Ok(m.ne(0.0)?.broadcast_as(shape)?.contiguous()?),
                    None => Ok(Tensor::ones(shape, DType::U8, x.device())?),
                }
            })
            .collect::<Result<_>>()?;
        if axis == rank - 1 {
            // Joining features: a position is kept when any input keeps it.
            let mut out = full[0].clone();
            for m in &full[1..] {
                out = out.maximum(m)?;
            }
            Ok(Some(out))
        } else {
            Ok(Some(Tensor::cat(&full, axis)?))
        }
    }
}
