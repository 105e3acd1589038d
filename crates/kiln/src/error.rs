//! One error type for the whole library: every failure a user can cause is a value, never a panic.

/// Everything that can go wrong in kiln. Messages name the thing involved (the loss, the layer,
/// the output, the file, the shapes) and say what to do about it.
///
/// `Debug` prints the same message as `Display`, so that `fn main() -> kiln::Result<()>` shows
/// the message (with its hint) rather than the variant's fields:
///
/// ```
/// let e = kiln::Error::Data("points.csv: row 3 has 2 fields".into());
/// assert_eq!(format!("{e:?}"), "data: points.csv: row 3 has 2 fields");
/// ```
///
/// Match on the variant to react to a kind of failure; the structured ones carry what they
/// name. New variants may come, so a `match` needs a `_` arm:
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([3]);
/// let y = Dense::new(1).with_name("out").apply(&x)?;
/// let mut model = Model::new(&[x], &[y])?;
/// model.compile(Compile::new(Sgd::new(0.1)).loss("mse"))?;
/// let data = Dataset::new(Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?, Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?)?;
/// match model.fit(&data, Fit::new().quiet()) {
///     Err(kiln::Error::LossShape(e)) => {
///         assert_eq!((e.output.as_str(), e.y_true.as_slice()), ("out", &[4, 2][..]));
///     }
///     Err(other) => panic!("unexpected: {other}"),
///     Ok(_) => panic!("targets of 2 columns for 1 unit must fail"),
/// }
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error("tensor error: {0}")]
    Candle(candle_core::Error),

    /// A value given to a constructor or builder is out of its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The functional graph cannot be built as described (unknown tensor, shape mismatch, …).
    #[error("model graph: {0}")]
    Graph(String),

    /// `compile` was given losses, weights or metrics that do not fit the model.
    #[error("compile: {0}")]
    Compile(String),

    /// A compile-time loss broke the per-sample contract.
    #[error("{0}")]
    LossContract(Box<ContractViolation>),

    /// A compile-time loss failed on the shapes it was given (targets that do not fit the
    /// output, most often).
    #[error("{0}")]
    LossShape(Box<LossShapeError>),

    /// An `add_loss` term returned more than one value.
    #[error(
        "added loss `{term}` returned a tensor of shape {shape:?}, not a scalar: reduce it to \
         one value (`.mean_all()?` for a mean over the batch, as Keras' activity regularizers; \
         a sum over the samples would grow with the batch size)"
    )]
    AddedLossShape {
        /// The term's name.
        term: String,
        /// The shape it returned.
        shape: Vec<usize>,
    },

    /// Training data do not fit the model (counts, shapes, sample weights).
    #[error("data: {0}")]
    Data(String),

    /// A model was used before `compile`, or a training run was stopped by a callback.
    #[error("{0}")]
    State(String),

    /// Data-parallel training failed across ranks: another rank failed (the message names
    /// it and its cause), the ranks disagree (data, model, run file), or the communicator
    /// (MPI) failed.
    #[error("distributed training: {0}")]
    Distributed(String),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: std::path::PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl From<candle_core::Error> for Error {
    /// Keeps candle's message and drops the backtrace it records under `RUST_BACKTRACE=1`,
    /// which would otherwise be printed inside kiln's one-line messages.
    fn from(e: candle_core::Error) -> Self {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Error::Candle(e)
    }
}

/// The result type of every fallible kiln function.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The same error with `what` before its message, keeping its variant, so that a caller
    /// adding context never turns a graph error into another kind.
    pub(crate) fn within(self, what: impl std::fmt::Display) -> Error {
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{what}: {m}")),
            Error::Graph(m) => Error::Graph(format!("{what}: {m}")),
            Error::Compile(m) => Error::Compile(format!("{what}: {m}")),
            Error::Data(m) => Error::Data(format!("{what}: {m}")),
            Error::State(m) => Error::State(format!("{what}: {m}")),
            Error::Candle(c) => Error::Candle(candle_core::Error::Msg(format!("{what}: {c}"))),
            other => other,
        }
    }
}

/// Shorthand for building an [`Error::InvalidArgument`].
pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// The details of a loss that failed on the shapes of its targets and output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error(
    "loss `{loss}` for output `{output}` cannot take y_true {y_true:?} and y_pred \
     {y_pred:?}{hint} (inside the loss: {detail})"
)]
pub struct LossShapeError {
    /// The loss's name.
    pub loss: String,
    /// The output it was compiled for.
    pub output: String,
    /// The shape of the targets.
    pub y_true: Vec<usize>,
    /// The shape of the output.
    pub y_pred: Vec<usize>,
    /// What to change, when the shapes tell (`: the targets have 3 columns …`), or empty.
    pub hint: String,
    /// The tensor library's message.
    pub detail: String,
}

/// The details of a loss that broke the per-sample contract.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ContractViolation {
    /// The loss's name.
    pub loss: String,
    /// The output it was compiled for.
    pub output: String,
    /// The batch size of the call.
    pub batch: usize,
    /// The shape the loss returned.
    pub got: Vec<usize>,
    /// The shape of `y_true`.
    pub y_true: Vec<usize>,
    /// The shape of `y_pred`.
    pub y_pred: Vec<usize>,
    /// Which part of the contract was broken.
    pub problem: ContractProblem,
}

/// How a loss broke the per-sample contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContractProblem {
    /// It did not return one value per sample (a scalar, or another batch size).
    WrongShape,
    /// It returned one value per sample, but a sample's value depends on the other samples:
    /// on the samples in another order it did not return the values in that order (a mean
    /// over the batch axis, most often).
    MixesSamples,
}

impl std::fmt::Display for ContractViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            loss,
            output,
            batch,
            got,
            y_true,
            y_pred,
            problem,
        } = self;
        match problem {
            ContractProblem::WrongShape => write!(
                f,
                "loss `{loss}` for output `{output}` must return one value per sample (shape \
                 [{batch}] or [{batch}, …]) but returned shape {got:?} for y_true {y_true:?} and \
                 y_pred {y_pred:?}: reduce over the feature axes only, never over the batch"
            ),
            ContractProblem::MixesSamples => write!(
                f,
                "loss `{loss}` for output `{output}` returned shape {got:?} for y_true \
                 {y_true:?} and y_pred {y_pred:?}, but its values mix the samples: on the same \
                 samples in reverse order it did not return the values in reverse order. A loss \
                 returns one value per sample, each from that sample alone: reduce over the \
                 feature axes (axis 1 and after, `D::Minus1`), never over the batch axis 0"
            ),
        }
    }
}

impl std::error::Error for ContractViolation {}
