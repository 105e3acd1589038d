//! kiln: Keras-style neural-network training on candle, with a loss system that is first class.
//!
//! Two kinds of loss, exactly as Keras users know them:
//! - **compile-time losses** ([`losses`]), from `y_true` and `y_pred`, one value per sample,
//!   given per output to [`Compile`];
//! - **added losses** ([`Model::add_loss`], [`regularizers`], layer-added terms), from the
//!   network itself.
//!
//! The step's total is Σ loss_weight · reduced compile-time loss + Σ added terms, and every term
//! is reported on its own.
//!
//! ```
//! use kiln::prelude::*;
//!
//! let data = kiln::data::digits(&Device::Cpu)?;
//! let x = Input::new([64]);
//! let h = Dense::new(32).activation(Activation::Relu).kernel_regularizer(L2::new(1e-4)).apply(&x)?;
//! let y = Dense::new(10).with_name("digit").apply(&h)?;
//! let mut model = Model::new(&[x], &[y])?;
//! model.compile(
//!     Compile::new(Adam::new(1e-2))
//!         .loss(SparseCategoricalCrossentropy::new().from_logits(true))
//!         .metric(Accuracy::sparse()),
//! )?;
//! let history = model.fit(&data, Fit::new().epochs(1).batch_size(64).quiet())?;
//! let logs = history.last().unwrap();
//! assert!(logs.get("l2").unwrap() > 0.0); // the regularizer, reported on its own
//! # Ok::<(), kiln::Error>(())
//! ```

pub mod activations;
pub mod adversarial;
pub mod callbacks;
pub mod cli;
pub mod conformance;
pub mod constraints;
mod cpu;
mod cpu_math;
pub mod data;
pub mod distributed;
pub mod error;
mod gradients;
pub mod graph;
pub mod initializers;
pub mod io;
pub mod keras;
pub mod layers;
pub mod loss_weighting;
pub mod losses;
pub mod metrics;
pub mod model;
pub mod optimizers;
mod plot;
pub mod random;
pub mod reduction;
pub mod regularizers;
pub mod run;
pub mod runtime;
mod softmax;

/// candle-core, the tensor library kiln runs on, at the version kiln uses: depend on kiln alone
/// and reach candle through it (`kiln::candle::Var`), with no version to match.
pub use candle_core as candle;

pub use activations::Activation;
pub use data::Dataset;
pub use error::{Error, Result};
pub use graph::{Input, SharedLayer, SymbolicTensor};
pub use initializers::Initializer;
pub use model::{
    AddedLoss, BatchGradients, Compile, Fit, History, Logs, Model, ProbabilityRule, Sequential,
    Tensors, TermGradient, TermGradients,
};
pub use reduction::Reduction;

/// The README's Rust (the "Using kiln in your crate" program among it), compiled and run as
/// doc tests, so that what it shows stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// Everything a training script usually needs, in one import: kiln's layers, losses,
/// optimizers and builders, and candle's `Tensor`, `Device`, `DType` and `D`.
///
/// ```
/// use kiln::prelude::*;
/// let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
/// assert_eq!(t.sum(D::Minus1)?.dims(), &[2]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub mod prelude {
    pub use crate::activations::Activation;
    pub use crate::adversarial::{Adversarial, PerturbationNorm};
    pub use crate::data::Dataset;
    pub use crate::graph::{Input, SharedLayer, SymbolicTensor};
    pub use crate::initializers::Initializer;
    pub use crate::layers::{
        ActivationLayer, Add, AveragePooling1D, AveragePooling2D, BatchNormalization, Concatenate,
        Conv1D, Conv2D, Dense, Dropout, Embedding, Flatten, GlobalAveragePooling1D,
        GlobalAveragePooling2D, GlobalMaxPooling1D, GlobalMaxPooling2D, Gru, Layer, LayerExt,
        LayerNormalization, LogicalOr, Lstm, Masking, MaxPooling1D, MaxPooling2D, Multiply,
        Normalization, NotEqual, Padding, Permute, ReduceAny, Reshape,
    };
    pub use crate::losses::{
        loss_fn, BinaryCrossentropy, BinaryFocalCrossentropy, CategoricalCrossentropy,
        CategoricalFocalCrossentropy, Huber, Loss, MeanAbsoluteError, MeanSquaredError,
        SparseCategoricalCrossentropy,
    };
    pub use crate::metrics::{
        Accuracy, Auc, F1Score, Precision, R2Score, Recall, RootMeanSquaredError,
        TopKCategoricalAccuracy,
    };
    pub use crate::model::{
        AddedLoss, BatchGradients, Compile, Fit, History, Logs, Model, ProbabilityRule, Sequential,
        Tensors,
    };
    pub use crate::optimizers::{Adam, AdamW, Optimizer, RmsProp, Sgd};
    pub use crate::reduction::Reduction;
    pub use crate::regularizers::{Orthogonal, Regularizer, L1, L1L2, L2};
    pub use crate::{Error, Result};
    pub use candle_core::{DType, Device, Tensor, D};
}
