//! A saved run's files from a stranger: mutated `model.json`, weights and checkpoints must give
//! an error (or, where a mutation happens to leave a valid file, a result), never a panic.

use super::mutations::{mutation, Mutation};
use candle_core::{Device, Tensor};
use kiln::prelude::*;
use kiln::run::RunFile;
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A trained run folder's `model.json`, weights and checkpoint, made once.
struct Saved {
    model_json: Vec<u8>,
    weights: Vec<u8>,
    checkpoint: Vec<u8>,
}

fn saved() -> &'static Saved {
    static SAVED: OnceLock<Saved> = OnceLock::new();
    SAVED.get_or_init(|| {
        let dir = temp("source");
        let run = RunFile::default_run();
        let options = kiln::run::TrainOptions {
            epochs: Some(1),
            out: dir.clone(),
            ..Default::default()
        };
        run.train(&options).unwrap();
        Saved {
            model_json: std::fs::read(dir.join("model.json")).unwrap(),
            weights: std::fs::read(dir.join("model.safetensors")).unwrap(),
            checkpoint: std::fs::read(dir.join("checkpoints/last.safetensors")).unwrap(),
        }
    })
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mutate(bytes: &[u8], ms: &[Mutation], head: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for m in ms {
        if b.is_empty() {
            break;
        }
        // Half of the mutations land in the first `head` bytes, where the structure is.
        let at = |i: usize| {
            if i.is_multiple_of(2) {
                (i / 2) % head.min(b.len())
            } else {
                (i / 2) % b.len()
            }
        };
        match *m {
            Mutation::Flip(i, x) => {
                let i = at(i);
                b[i] ^= x;
            }
            Mutation::Insert(i, x) => {
                let i = at(i);
                b.insert(i, x);
            }
            Mutation::Delete(i) => {
                let i = at(i);
                b.remove(i);
            }
            Mutation::Truncate(i) => {
                let i = at(i);
                b.truncate(i);
            }
        }
    }
    b
}

/// The default run's model, compiled, for loading weights and checkpoints into.
fn model() -> Model {
    let x = Input::new([64]);
    let h = Dense::new(64).with_name("hidden").apply(&x).unwrap();
    let y = Dense::new(10).with_name("digit").apply(&h).unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.compile(Compile::new(Adam::new(1e-3)).loss("mse"))
        .unwrap();
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn a_mutated_model_json_never_panics(ms in prop::collection::vec(mutation(), 1..4)) {
        let dir = temp("json");
        let path = dir.join("model.json");
        std::fs::write(&path, mutate(&saved().model_json, &ms, 4096)).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            RunFile::from_path(&path).and_then(|r| r.prepare(None, &Device::Cpu).map(|_| ()))
        }));
        prop_assert!(outcome.is_ok(), "panicked on {ms:?}");
        if let Ok(Err(e)) = outcome {
            prop_assert!(e.to_string().contains("model.json"), "{e}");
        }
    }

    #[test]
    fn mutated_weights_never_panic_and_change_nothing_when_refused(
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let dir = temp("weights");
        let path = dir.join("w.safetensors");
        std::fs::write(&path, mutate(&saved().weights, &ms, 512)).unwrap();
        let m = model();
        let before: Vec<Tensor> = m.weights().iter().map(|w| w.var.as_tensor().copy().unwrap()).collect();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.load_weights(&path)));
        prop_assert!(outcome.is_ok(), "panicked on {ms:?}");
        if let Ok(Err(e)) = outcome {
            prop_assert!(e.to_string().contains("w.safetensors"), "{e}");
            for (w, b) in m.weights().iter().zip(&before) {
                let same = w.var.as_tensor().eq(b).unwrap().min_all().unwrap().to_scalar::<u8>().unwrap();
                prop_assert_eq!(same, 1, "a refused file changed `{}`", w.name);
            }
        }
    }

    #[test]
    fn a_mutated_checkpoint_never_panics_and_a_changed_tensor_is_refused(
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let dir = temp("ckpt");
        let bytes = mutate(&saved().checkpoint, &ms, 2048);
        std::fs::write(dir.join("last.safetensors"), &bytes).unwrap();
        let mut m = model();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || m.load_checkpoint(&dir, "last").map(|_| ())));
        prop_assert!(outcome.is_ok(), "panicked on {ms:?}");
    }
}

#[test]
fn every_single_byte_flip_in_a_checkpoints_data_is_caught() {
    let good = &saved().checkpoint;
    let header = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize + 8;
    let dir = temp("flips");
    // Every 97th byte of the tensor data (about 60 positions), each flipped in one bit.
    for at in (header..good.len()).step_by(97) {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        std::fs::write(dir.join("last.safetensors"), &bad).unwrap();
        let err = model()
            .load_checkpoint(&dir, "last")
            .err()
            .unwrap_or_else(|| panic!("a flip at byte {at} was not caught"));
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
