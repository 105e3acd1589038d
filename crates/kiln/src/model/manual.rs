//! What a hand-written training step uses: the model or one layer run in either mode outside
//! `fit`, the gradients of a batch without an update, and the weights in Keras' order.

use super::history::Accumulator;
use super::train::no_labeled_loss;
use super::{not_compiled, Logs, Model};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::graph::SharedLayer;
use crate::layers::CallContext;
use crate::random::StepRandom;
use candle_core::{Tensor, Var};
use std::sync::atomic::{AtomicU64, Ordering};

/// Steps for calls outside `fit`: every call draws other dropout masks, in a fixed sequence.
static CALLS: AtomicU64 = AtomicU64::new(0);

fn call_random() -> StepRandom {
    StepRandom::new(0x6B69_6C6E, CALLS.fetch_add(1, Ordering::Relaxed))
}

/// The gradients of one batch's total loss, from [`Model::gradients`].
#[derive(Debug, Clone)]
pub struct BatchGradients {
    /// Each trainable weight's name and gradient, in [`Model::trainable_weights`] order (zeros
    /// for a weight the loss does not depend on).
    pub weights: Vec<(String, Tensor)>,
    /// The gradient with respect to each input, in model order.
    pub inputs: Vec<Tensor>,
    /// The batch's loss breakdown and metrics, as `train_on_batch` reports them.
    pub logs: Logs,
}

impl BatchGradients {
    /// The gradient of the weight named `name`.
    pub fn weight(&self, name: &str) -> Option<&Tensor> {
        self.weights.iter().find(|(n, _)| n == name).map(|(_, g)| g)
    }
}

impl Model {
    /// Runs the model on a batch and returns its outputs, in training mode (`true`: dropout
    /// active, BatchNormalization on batch statistics and updating its moving ones) or in
    /// inference mode, as Keras' `model(x, training=…)`. The outputs keep their graph, so a
    /// hand-written step can differentiate them; each call draws new dropout masks.
    ///
    /// ```
    /// use kiln::candle::{DType, Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([100]);
    /// let y = Dropout::new(0.5).apply(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// let ones = Tensor::ones((1, 100), DType::F32, &Device::Cpu)?;
    /// let kept = |t: &Tensor| -> kiln::Result<f32> { Ok(t.ne(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar()?) };
    /// assert_eq!(kept(&model.call(&[ones.clone()], false)?[0])?, 100.0);
    /// assert!(kept(&model.call(&[ones], true)?[0])? < 80.0);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Data`] when the inputs' count or shapes do not fit the model; a layer's error.
    pub fn call(&self, inputs: &[Tensor], training: bool) -> Result<Vec<Tensor>> {
        let pass = self.run(inputs, training, &mut call_random())?;
        Ok(self.outputs_of(&pass).into_iter().cloned().collect())
    }

    /// The gradients of a batch's total loss (every compiled and added term, the adversarial
    /// one included) with respect to every trainable weight and every input, in training mode
    /// as a step of `fit`, without updating any weight. A BatchNormalization still updates its
    /// moving statistics, as in Keras' training-mode call.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([1]);
    /// let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Sgd::new(0.1)).loss("mse"))?;
    /// let batch = Dataset::new(Tensor::new(&[[2f32]], &Device::Cpu)?, Tensor::new(&[[0f32]], &Device::Cpu)?)?;
    /// let g = model.gradients(&batch)?;
    /// // loss = (w·x)², d/dw = 2·w·x² = 8, d/dx = 2·w²·x = 4; the weight is unchanged.
    /// assert_eq!(g.weight("dense/kernel").unwrap().flatten_all()?.to_vec1::<f32>()?, [8.0]);
    /// assert_eq!(g.inputs[0].flatten_all()?.to_vec1::<f32>()?, [4.0]);
    /// assert_eq!(g.logs.get("loss"), Some(4.0));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::State`] before `compile`; the errors of a training step.
    pub fn gradients(&self, batch: &Dataset) -> Result<BatchGradients> {
        let compiled = self.compiled.as_ref().ok_or_else(not_compiled)?;
        let batch = batch.to_device(&self.device)?;
        let vars: Vec<Var> = batch
            .inputs()
            .iter()
            .map(|x| Var::from_tensor(&x.to_dtype(self.dtype)?.detach()).map_err(Error::from))
            .collect::<Result<_>>()?;
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let mut random = call_random();
        let pass = self.run(&xs, true, &mut random)?;
        let adversarial = self.adversarial_term();
        let mut terms =
            self.step_terms(compiled, &batch, &pass, true, adversarial.is_some(), false)?;
        let mut total = terms.total.clone();
        if let Some((name, adv)) = adversarial {
            let x_adv = self.attack(compiled, &adv, &batch, None, true, &mut random)?;
            let adv_pass = self.run(&x_adv, true, &mut random)?;
            let labeled = self.compiled_loss(compiled, &batch, &adv_pass)?.total;
            let term = (labeled.ok_or_else(no_labeled_loss)? * adv.weight())?;
            total = (total + &term)?;
            terms.push_detached(name, term.detach())?;
        }
        let mut grads = crate::gradients::Gradients::default();
        grads.backward(&total)?;
        terms.total = total.detach();
        let mut weights = Vec::new();
        for w in self.trainable_weights() {
            let g = match grads.take(w.var.as_tensor())? {
                Some(g) => g.detach(),
                None => w.var.as_tensor().zeros_like()?,
            };
            weights.push((w.name, g));
        }
        let inputs = vars
            .iter()
            .map(|v| match grads.take(v.as_tensor())? {
                Some(g) => Ok(g.detach()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect::<Result<_>>()?;
        let mut acc = Accumulator::default();
        self.record(compiled, &mut acc, &terms, &batch, &pass)?;
        Ok(BatchGradients {
            weights,
            inputs,
            logs: acc.logs(""),
        })
    }

    /// Applies gradients with the compiled optimizer, as Keras'
    /// `optimizer.apply_gradients(zip(grads, model.trainable_weights))`: the optimizer's
    /// clipping (`clipnorm`, `global_clipnorm`, `clipvalue`) and weight decay, and one more
    /// step on its counter, exactly as a step of `fit` applies them. Give `(name, gradient)`
    /// pairs as [`BatchGradients::weights`] holds them, changed as your step needs; weights not
    /// listed are left alone.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([1]);
    /// let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Sgd::new(0.1).global_clipnorm(1.0)).loss("mse"))?;
    /// let batch = Dataset::new(Tensor::new(&[[2f32]], &Device::Cpu)?, Tensor::new(&[[0f32]], &Device::Cpu)?)?;
    /// let mut g = model.gradients(&batch)?; // d/dw (w·x)² = 8 at w = 1
    /// g.weights[0].1 = (&g.weights[0].1 * 0.5)?; // a step of your own: halve it
    /// model.apply_gradients(&g.weights)?; // clipped to norm 1, then w -= 0.1 · 1
    /// assert_eq!(model.get_weights()?[0].to_vec2::<f32>()?, [[0.9]]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::State`] before `compile`; [`Error::Data`] naming a gradient whose weight does
    /// not exist, is frozen, is given twice or has another shape (nothing is updated then).
    pub fn apply_gradients(&mut self, gradients: &[(String, Tensor)]) -> Result<()> {
        if self.compiled.is_none() {
            return Err(not_compiled());
        }
        let trainable = self.trainable_weights();
        let mut params: Vec<Var> = Vec::with_capacity(gradients.len());
        let mut grads = Vec::with_capacity(gradients.len());
        for (i, (name, g)) in gradients.iter().enumerate() {
            let Some(w) = trainable.iter().find(|w| &w.name == name) else {
                let why = match self.weights().iter().any(|w| &w.name == name) {
                    true => "is frozen (not trainable): unfreeze its layer with set_trainable, \
                             or leave its gradient out"
                        .to_string(),
                    false => format!(
                        "does not exist; the trainable weights are {:?}",
                        trainable
                            .iter()
                            .map(|w| w.name.as_str())
                            .collect::<Vec<_>>()
                    ),
                };
                return Err(Error::Data(format!(
                    "apply_gradients: the weight `{name}` of gradient {i} {why}"
                )));
            };
            if gradients[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::Data(format!(
                    "apply_gradients: the weight `{name}` has two gradients (entries {} and \
                     {i}): sum them into one",
                    gradients.iter().position(|(n, _)| n == name).unwrap_or(0)
                )));
            }
            if g.dims() != w.shape() {
                return Err(Error::Data(format!(
                    "apply_gradients: the gradient of `{name}` has shape {:?}, the weight {:?}",
                    g.dims(),
                    w.shape()
                )));
            }
            params.push(w.var.clone());
            grads.push(g.to_device(&self.device)?.to_dtype(self.dtype)?);
        }
        let constraints = self.constraints_of(&params);
        let compiled = self.compiled.as_mut().ok_or_else(not_compiled)?;
        compiled.iterations += 1;
        crate::optimizers::apply_step(
            compiled.optimizer.as_mut(),
            &params,
            grads,
            compiled.iterations,
            &constraints,
        )
    }

    /// Every weight's value, in [`Model::weights`] order (Keras' `get_weights`, layer by
    /// layer), as copies that later training does not change.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(2).apply(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// let values = model.get_weights()?;
    /// assert_eq!(values[0].dims(), &[3, 2]); // kernel, then bias
    /// let doubled = values.iter().map(|t| t * 2.0).collect::<kiln::candle::Result<Vec<_>>>()?;
    /// model.set_weights(&doubled)?;
    /// assert_eq!(model.get_weights()?[0].to_vec2::<f32>()?, doubled[0].to_vec2::<f32>()?);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// A tensor error when a value cannot be copied.
    pub fn get_weights(&self) -> Result<Vec<Tensor>> {
        self.weights()
            .iter()
            .map(|w| Ok(w.var.as_tensor().copy()?.detach()))
            .collect()
    }

    /// Sets every weight from values in [`Model::get_weights`] order (Keras' `set_weights`):
    /// one per weight with its shape, or nothing is changed.
    ///
    /// # Errors
    /// [`Error::Data`] naming the first weight whose value is missing or has another shape.
    pub fn set_weights(&self, values: &[Tensor]) -> Result<()> {
        let weights = self.weights();
        if values.len() != weights.len() {
            return Err(Error::Data(format!(
                "set_weights got {} values for the model's {} weights ({:?}): give one per \
                 weight, in get_weights order",
                values.len(),
                weights.len(),
                weights.iter().map(|w| w.name.as_str()).collect::<Vec<_>>()
            )));
        }
        let mut converted = Vec::with_capacity(values.len());
        for (w, v) in weights.iter().zip(values) {
            if v.dims() != w.shape() {
                return Err(Error::Data(format!(
                    "set_weights: value {} for weight `{}` has shape {:?}, the weight {:?}",
                    converted.len(),
                    w.name,
                    v.dims(),
                    w.shape()
                )));
            }
            converted.push(v.to_device(&self.device)?.to_dtype(self.dtype)?);
        }
        for (w, v) in weights.iter().zip(&converted) {
            w.var.set(v)?;
        }
        Ok(())
    }
}

impl SharedLayer {
    /// Runs this (built) layer alone on a batch, in training or inference mode, as Keras'
    /// `layer(x, training=…)`; the terms it adds while running are dropped. Build it first by
    /// making a model that uses it.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([2]);
    /// let dense = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones).shared();
    /// let y = dense.apply(&x)?;
    /// let _model = Model::new(&[x], &[y])?; // builds the layer's weights
    /// let out = dense.call(&[Tensor::new(&[[1f32, 2.]], &Device::Cpu)?], false)?;
    /// assert_eq!(out.to_vec2::<f32>()?, [[3.0]]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::State`] when the layer has not been built; the layer's own errors.
    pub fn call(&self, inputs: &[Tensor], training: bool) -> Result<Tensor> {
        let streams = call_random().next_pass().streams(self.lock().kind(), 0, 0);
        let mut ctx = CallContext::new(training, streams);
        ctx.layer_trainable = self.is_trainable();
        self.lock().call(inputs, &mut ctx)
    }
}
