//! `Sequential`: a stack of single-input layers, built on the functional graph.

use super::Model;
use crate::error::Result;
use crate::graph::{Input, SymbolicTensor};
use crate::layers::LayerExt;

/// A plain stack of layers. Errors (such as a shape that does not fit) are reported by `build`.
///
/// ```
/// use kiln::prelude::*;
/// let model = Sequential::new([64])
///     .add(Dense::new(32).activation(Activation::Relu))
///     .add(Dropout::new(0.1))
///     .add(Dense::new(10).with_name("digit"))
///     .build()?;
/// assert_eq!(model.output_names(), &["digit".to_string()]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Sequential {
    input: SymbolicTensor,
    last: Result<SymbolicTensor>,
    seed: u64,
}

impl Sequential {
    /// A stack whose samples have `input_shape` (batch axis left out).
    pub fn new(input_shape: impl Into<Vec<usize>>) -> Self {
        let input = Input::new(input_shape);
        Self {
            last: Ok(input.clone()),
            input,
            seed: 0,
        }
    }
    /// Appends a layer.
    #[allow(clippy::should_implement_trait)]
    pub fn add(mut self, layer: impl LayerExt) -> Self {
        self.last = self.last.and_then(|x| layer.apply(&x));
        self
    }
    /// The seed the weights are drawn from (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Builds the model.
    pub fn build(self) -> Result<Model> {
        let out = self.last?;
        Model::builder(&[self.input], &[out])
            .seed(self.seed)
            .build()
    }
}
