//! Keras interchange: Keras 3 `.keras` files in and out.
//!
//! - [`Model::from_keras`] reads a `.keras` file (a zip of `config.json`, `metadata.json` and
//!   `model.weights.h5`) into a kiln model with the same graph and weights, compiled with the
//!   file's `compile_config` when it has one. Weights keep Keras' layer paths as kiln names
//!   (`hidden/kernel`; inside a nested model `encoder/dense/kernel`).
//! - [`Model::save_keras`] writes a `.keras` file that `keras.saving.load_model` loads.
//!
//! Files from strangers are treated as hostile: an unknown layer, option, activation or loss is
//! an error naming its place in the config (`config.layers[3].config.dilation_rate`); Lambda
//! layers and custom classes are refused (kiln never runs code from a file); HDF5 soft and
//! external links are never followed; a dataset's declared size is checked against the file
//! before anything is allocated; the zip is read with bounded decompression.

mod archive;
pub(crate) mod compile;
mod compile_out;
mod export;
mod graph;
mod h5;
mod json;
mod layers;
mod legacy;

use crate::error::{Error, Result};
use crate::model::Model;
use graph::LayerSlot;
use std::path::Path;
use std::sync::Arc;

/// What an imported model keeps of its Keras file, so that exporting it writes the same
/// architecture back with its current weights.
pub(crate) struct Source {
    /// `model.keras: config.json`, for messages.
    file: String,
    config: serde_json::Value,
    slots: Vec<LayerSlot>,
    /// Each Keras output name with the kiln output it became.
    outputs: Vec<(String, String)>,
    /// `keras_version` from metadata.json, if it has one.
    keras_version: Option<String>,
    /// Where the compile configuration came from, for messages: `(file, path)`, as
    /// `("model.keras: config.json", "compile_config")` or, for a legacy file,
    /// `("m.h5: training_config", "")`.
    compile_place: (String, &'static str),
}

/// The crossentropy rule of the Keras that wrote a file: Keras 2 (`tf.keras`, which writes
/// `.keras` files from 2.13 on) computes crossentropies of softmax and sigmoid outputs from
/// their logits; Keras 3 on JAX, kiln's default, from clipped probabilities.
fn probability_rule_of(keras_version: Option<&str>) -> crate::model::ProbabilityRule {
    match keras_version.and_then(|v| v.split('.').next()) {
        Some("2") | Some("1") => crate::model::ProbabilityRule::Logits,
        _ => crate::model::ProbabilityRule::Clipped,
    }
}

/// The compile configuration of the Keras file `model` was imported from: what `[compile]
/// keras = true` in a run file means.
pub(crate) fn compile_config_of(model: &Model) -> Result<crate::model::Compile> {
    let src = model.keras.as_ref().ok_or_else(|| {
        Error::Compile("`keras = true` takes the compile configuration of a Keras model, but the model was not imported from Keras".into())
    })?;
    // An uncompiled model writes `{}` (or nothing).
    let cc = src
        .config
        .get("compile_config")
        .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        .ok_or_else(|| {
            Error::Data(format!(
                "{}: the model was saved without compiling: it has no compile_config",
                src.file
            ))
        })?;
    let (file, root) = &src.compile_place;
    Ok(
        compile::compile(&json::Obj::new(cc, *root, file)?, &src.outputs)?
            .probability_rule(probability_rule_of(src.keras_version.as_deref())),
    )
}

/// Whether `path` is a legacy Keras `.h5` file rather than a `.keras` archive, told by its
/// content whatever its name. A zip archive (its first bytes `PK\x03\x04`) is a `.keras`
/// file even when the HDF5 signature appears at an offset HDF5 allows for a superblock (512,
/// 1024, … 8192): Keras stores `model.weights.h5` uncompressed, so it can start there.
pub(crate) fn is_legacy_h5(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| crate::io::io_error(path, e))?;
    let n = f
        .read(&mut head)
        .map_err(|e| crate::io::io_error(path, e))?;
    if n == 4 && head == *b"PK\x03\x04" {
        return Ok(false);
    }
    hdf5_pure::is_hdf5(path).map_err(|e| crate::io::io_error(path, e))
}

/// Reads a `.keras` file; compiles the model with its `compile_config` when `compile` is true
/// and the file has one.
///
/// ```
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/keras/mlp_sequential.keras");
/// let model = kiln::keras::load(path, false)?;
/// assert_eq!(model.weight("hidden/kernel")?.var.dims(), &[6, 8]);
/// assert!(!model.is_compiled());
/// # Ok::<(), kiln::Error>(())
/// ```
///
/// # Errors
///
/// When the file is not a readable `.keras` file, has a layer, option, activation, loss or
/// optimizer kiln does not have (the message names its place in `config.json`), refers to
/// data outside the file, or its weights do not fit the architecture.
pub fn load(path: impl AsRef<Path>, compile: bool) -> Result<Model> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let is_h5 = is_legacy_h5(path)?;
    let (mut config, keras_version, weights, file) = if is_h5 {
        let bytes = std::fs::read(path).map_err(|e| crate::io::io_error(path, e))?;
        let l = legacy::read(bytes, &shown)?;
        (
            l.config,
            l.keras_version,
            l.weights,
            format!("{shown}: model_config"),
        )
    } else {
        let archive = archive::read(path)?;
        let config: serde_json::Value = serde_json::from_slice(&archive.config)
            .map_err(|e| Error::Data(format!("{shown}: config.json is not JSON: {e}")))?;
        let mut keras_version = None;
        if let Some(meta) = &archive.metadata {
            let meta: serde_json::Value = serde_json::from_slice(meta)
                .map_err(|_| Error::Data(format!("{shown}: metadata.json is not JSON")))?;
            keras_version = meta
                .get("keras_version")
                .and_then(|v| v.as_str())
                .map(str::to_string);
        }
        let weights = h5::WeightsFile::new(archive.weights, format!("{shown}: model.weights.h5"))?;
        (
            config,
            keras_version,
            weights,
            format!("{shown}: config.json"),
        )
    };
    let root = json::Obj::new(&config, "", &file)?;
    let mut reader = graph::Reader {
        file: &file,
        slots: Vec::new(),
        legacy: is_h5,
    };
    let g = reader.model(&root, "", "layers")?;
    // The weights file must hold every weight the config describes, and no other, before any
    // model is built (its shapes are checked once the model gives them, before any is set).
    let stored = if is_h5 {
        legacy::locate(&weights, &reader.slots)?
    } else {
        check_stored(&weights, &reader.slots)?;
        stored_of(&reader.slots)
    };
    let inputs = g.kiln_inputs();
    let outputs = g.apply(&file, &inputs)?;
    let mut model = Model::builder(&inputs, &outputs)
        .build()
        .map_err(|e| Error::Data(format!("{file}: {e}")))?;
    load_weights(&model, &weights, &stored)?;
    drop(root);
    legacy::fill_shapes(&mut config, &g.filled_shapes());
    let names: Vec<(String, String)> = g
        .output_names()
        .into_iter()
        .zip(model.output_names().iter().cloned())
        .collect();
    let has_compile = config
        .get("compile_config")
        .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()));
    model.keras = Some(Arc::new(Source {
        file: file.clone(),
        config,
        slots: reader.slots,
        outputs: names,
        keras_version,
        compile_place: if is_h5 {
            (format!("{shown}: training_config"), "")
        } else {
            (file.clone(), "compile_config")
        },
    }));
    if compile && has_compile {
        let c = compile_config_of(&model)?;
        model
            .compile(c)
            .map_err(|e| Error::Data(format!("{file}: compile_config: {e}")))?;
    }
    Ok(model)
}

/// Writes `model` as a Keras 3 `.keras` file, whole or not at all, with its compile
/// configuration when `compile` is true and the model is compiled ([`Model::save_keras`]);
/// with `compile` false the file loads uncompiled in Keras (an imported model keeps the
/// compile configuration of its file), for a model whose loss setup Keras cannot hold.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("kiln-doc-save-un-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// use kiln::prelude::*;
/// let x = Input::new([2]);
/// let y = Dense::new(1).with_name("out").apply(&x)?;
/// let mut model = Model::new(&[x], &[y])?;
/// model.add_loss("small", |t: &Tensors| Ok((t.output("out")?.sqr()?.mean_all()? * 1e-3)?))?;
/// model.compile(Compile::new(Sgd::new(0.1)).loss("mse"))?;
/// assert!(model.save_keras(dir.join("m.keras")).is_err()); // Keras has no added losses
/// kiln::keras::save(&model, dir.join("m.keras"), false)?;
/// assert!(!kiln::keras::load(dir.join("m.keras"), true)?.is_compiled());
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`Model::save_keras`], but for the compile configuration when `compile` is false.
pub fn save(model: &Model, path: impl AsRef<Path>, compile: bool) -> Result<()> {
    // An imported model writes its own config back, explicit masks included.
    let masked = model.explicitly_masked_layers();
    if model.keras.is_none() && !masked.is_empty() {
        return Err(Error::Data(format!(
            "layers or nested models {masked:?} are given explicit masks, which kiln does not \
             export to Keras yet: the file would lose them (export the model built without \
             them, or build it in Keras)"
        )));
    }
    export::save(model, path.as_ref(), compile)
}

/// Each kiln weight of `slots` with the group and dataset Keras keeps it in.
fn stored_of(slots: &[LayerSlot]) -> Vec<(String, String, String)> {
    slots
        .iter()
        .flat_map(|slot| {
            slot.weights.iter().enumerate().map(|(i, w)| {
                (
                    format!("{}/{w}", slot.kiln),
                    slot.vars.clone(),
                    i.to_string(),
                )
            })
        })
        .collect()
}

/// Checks that the weights file stores each layer's weights (`vars/0`, `vars/1`, …) and no
/// more, naming the first layer and weight that differ.
fn check_stored(file: &h5::WeightsFile, slots: &[LayerSlot]) -> Result<()> {
    for slot in slots {
        let stored = file.dataset_names(&slot.vars)?;
        let expected: Vec<String> = (0..slot.weights.len()).map(|i| i.to_string()).collect();
        if let Some((i, w)) = slot
            .weights
            .iter()
            .enumerate()
            .find(|(i, _)| !stored.contains(&i.to_string()))
        {
            return Err(Error::Data(format!(
                "{}: /{}/{i}: weight `{}/{w}` of layer `{}` is not stored in the file (kiln \
                 reads datasets stored in the file itself and never follows soft or external \
                 links): the weights file does not hold the model config.json describes",
                file_name(file),
                slot.vars,
                slot.kiln,
                slot.kiln
            )));
        }
        if let Some(extra) = stored.iter().find(|n| !expected.contains(n)) {
            return Err(Error::Data(format!(
                "{}: /{}/{extra}: layer `{}` has {} weight(s) as config.json describes it but the \
                 weights file stores more: the two describe different architectures",
                file_name(file),
                slot.vars,
                slot.kiln,
                slot.weights.len()
            )));
        }
    }
    Ok(())
}

/// Sets every weight from the file (`stored`: each kiln weight with its group and dataset),
/// after all of them have been read and checked: a bad file changes nothing.
fn load_weights(
    model: &Model,
    file: &h5::WeightsFile,
    stored: &[(String, String, String)],
) -> Result<()> {
    let mut values = Vec::new();
    for (name, group, dataset) in stored {
        let weight = model.weight(name)?;
        let dims = weight.var.dims().to_vec();
        let data = file.read(group, dataset, &dims, name)?;
        values.push((
            weight,
            candle_core::Tensor::from_vec(data, dims, model.device())?,
        ));
    }
    for (w, t) in values {
        w.var.set(&t.to_dtype(w.var.dtype())?)?;
    }
    Ok(())
}

fn file_name(file: &h5::WeightsFile) -> String {
    file.shown().to_string()
}

impl Model {
    /// Reads a Keras 3 `.keras` file: the same graph and weights, compiled with the file's
    /// `compile_config` when it has one (as `keras.saving.load_model` does).
    ///
    /// ```
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/keras/nested_shared.keras");
    /// let model = kiln::Model::from_keras(path)?;
    /// assert_eq!(model.weight("encoder/dense/kernel")?.var.dims(), &[5, 3]);
    /// assert!(model.is_compiled());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`load`]; also when the compile configuration has a loss, metric or optimizer kiln
    /// lacks, or a custom loss that is not registered ([`crate::losses::register`]).
    pub fn from_keras(path: impl AsRef<Path>) -> Result<Model> {
        load(path, true)
    }

    /// Reads a Keras 3 weights-only file (`model.save_weights("m.weights.h5")`, or the
    /// `model.weights.h5` inside a `.keras` file) onto this model, which must have the same
    /// architecture: each layer's weights are found where Keras keeps them (`layers/dense_1/vars`,
    /// `layers/lstm/cell/vars`, by Keras' order of the layers and their classes, whatever their
    /// names), and every one is read and checked (present, no others in its group, its shape)
    /// before any is set, so a file that does not fit changes nothing. The file is read as a
    /// stranger's: datasets stored in it only (no soft or external links), declared sizes
    /// checked against the file before anything is allocated.
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("kiln-doc-kw-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// use kiln::prelude::*;
    /// let build = |seed| {
    ///     let x = Input::new([3]);
    ///     let h = Dense::new(4).activation(Activation::Relu).apply(&x)?;
    ///     let y = Dense::new(1).apply(&h)?;
    ///     Model::builder(&[x], &[y]).seed(seed).build()
    /// };
    /// let (a, b) = (build(1)?, build(2)?);
    /// a.save_keras(dir.join("a.keras"))?;
    /// // The weights file inside a .keras archive has save_weights' layout.
    /// let mut zip = zip::ZipArchive::new(std::fs::File::open(dir.join("a.keras"))?)?;
    /// let mut h5 = Vec::new();
    /// std::io::Read::read_to_end(&mut zip.by_name("model.weights.h5")?, &mut h5)?;
    /// std::fs::write(dir.join("a.weights.h5"), h5)?;
    /// b.load_keras_weights(dir.join("a.weights.h5"))?;
    /// assert_eq!(
    ///     b.weights()[0].var.as_tensor().to_vec2::<f32>()?,
    ///     a.weights()[0].var.as_tensor().to_vec2::<f32>()?
    /// );
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// When the file is not a readable HDF5 file, refers to data outside itself, lacks a
    /// weight of the model or holds more in a layer's group (the message names the layer, the
    /// weight and its place in the file), a shape differs, or a layer has no Keras equivalent.
    pub fn load_keras_weights(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| crate::io::io_error(path, e))?;
        let file = h5::WeightsFile::new(bytes, shown.clone())?;
        let native;
        let slots: &[LayerSlot] = match &self.keras {
            Some(source) => &source.slots,
            None => {
                native = export::weight_groups(self, &shown)?
                    .into_iter()
                    .map(|(kiln, vars, weights)| LayerSlot {
                        kiln,
                        vars,
                        weights: weights.into_iter().map(|(w, _)| w).collect(),
                    })
                    .collect::<Vec<_>>();
                &native
            }
        };
        check_stored(&file, slots)?;
        load_weights(self, &file, &stored_of(slots))
    }

    /// Writes the model as a Keras 3 `.keras` file that `keras.saving.load_model` reads,
    /// whole or not at all. A model imported from Keras is written with its original
    /// configuration and its current weights.
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("kiln-doc-save-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// use kiln::Model;
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/keras/mlp_sequential.keras");
    /// let model = Model::from_keras(path)?;
    /// model.save_keras(dir.join("model.keras"))?;
    /// let back = Model::from_keras(dir.join("model.keras"))?;
    /// assert_eq!(
    ///     back.weight("hidden/kernel")?.var.as_tensor().to_vec2::<f32>()?,
    ///     model.weight("hidden/kernel")?.var.as_tensor().to_vec2::<f32>()?
    /// );
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// When a layer of a kiln-built model has no Keras equivalent (a layer of your own, a
    /// custom regularizer; the message names it), when the model is compiled with something
    /// Keras' `compile_config` cannot hold (a loss or optimizer Keras has no class for, an
    /// unregistered loss closure, an added loss, a loss weighting strategy, a metric with
    /// parameters Keras' names do not give), or the file cannot be written. A compiled model
    /// writes its compile configuration, so that Keras loads it compiled.
    pub fn save_keras(&self, path: impl AsRef<Path>) -> Result<()> {
        save(self, path, true)
    }
}

#[cfg(test)]
mod tests {
    use super::probability_rule_of;
    use crate::model::ProbabilityRule;

    #[test]
    fn keras_2_files_get_keras_2s_crossentropy_rule() {
        assert_eq!(probability_rule_of(Some("2.15.0")), ProbabilityRule::Logits);
        assert_eq!(
            probability_rule_of(Some("3.15.1")),
            ProbabilityRule::Clipped
        );
        assert_eq!(probability_rule_of(None), ProbabilityRule::Clipped);
    }
}
