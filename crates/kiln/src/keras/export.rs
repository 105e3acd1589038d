//! Writing a `.keras` file: the architecture an imported model came with, and its current
//! weights at the places Keras reads them from.

use super::h5::Tree;
use crate::error::{Error, Result};
use crate::model::Model;
use std::path::Path;

/// Writes `model` to `path` (whole or not at all).
pub(crate) fn save(model: &Model, path: &Path) -> Result<()> {
    let source = model.keras.as_ref().ok_or_else(|| {
        Error::Data(format!(
            "{}: save_keras writes models imported from Keras (Model::from_keras); writing the \
             Keras configuration of a model built in kiln is not supported yet",
            path.display()
        ))
    })?;
    let mut tree = Tree::default();
    for slot in &source.slots {
        let group = tree.group(&slot.vars);
        group.set_name(slot.kiln.rsplit('/').next().unwrap_or(&slot.kiln));
        for (i, w) in slot.weights.iter().enumerate() {
            let weight = model.weight(&format!("{}/{w}", slot.kiln))?;
            let t = weight.var.as_tensor();
            let values = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            group.dataset(&i.to_string(), t.dims().to_vec(), values);
        }
    }
    let weights = tree.to_bytes()?;
    let config = serde_json::to_vec(&source.config)
        .map_err(|e| Error::Data(format!("{}: cannot write config.json: {e}", path.display())))?;
    let metadata = serde_json::json!({
        "keras_version": "3.15.1",
        "exported_by": concat!("kiln ", env!("CARGO_PKG_VERSION")),
    });
    super::archive::write(path, &config, metadata.to_string().as_bytes(), &weights)
}
