//! Callbacks: resume exactness, early stopping, learning-rate control, NaN guard, CSV log.

use candle_core::{Device, Tensor};
use kiln::callbacks::*;
use kiln::prelude::*;
use std::sync::{Arc, Mutex};

fn model(seed: u64) -> Model {
    let x = Input::new([64]);
    let h = Dense::new(16)
        .activation(Activation::Relu)
        .apply(&x)
        .unwrap();
    let h = Dropout::new(0.1).apply(&h).unwrap();
    let y = Dense::new(10).apply(&h).unwrap();
    let mut m = Model::builder(&[x], &[y]).seed(seed).build().unwrap();
    m.compile(
        Compile::new(Adam::new(1e-2)).loss(SparseCategoricalCrossentropy::new().from_logits(true)),
    )
    .unwrap();
    m
}

fn data() -> Dataset {
    kiln::data::digits(&Device::Cpu)
        .unwrap()
        .slice(0, 400)
        .unwrap()
}

fn weights(m: &Model) -> Vec<Vec<f32>> {
    m.weights()
        .iter()
        .map(|w| w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_resumed_run_ends_with_the_same_weights() {
    let dir = temp_dir("resume");
    let fit = || {
        Fit::new()
            .epochs(6)
            .batch_size(32)
            .seed(9)
            .validation_split(0.1)
            .quiet()
    };
    let mut straight = model(1);
    straight.fit(&data(), fit()).unwrap();

    let mut first = model(1);
    first
        .fit(
            &data(),
            fit().epochs(3).callback(ModelCheckpoint::new(&dir)),
        )
        .unwrap();
    let mut resumed = model(2); // other initial weights: the checkpoint must replace them all
    let ckpt = resumed.load_checkpoint(&dir, "last").unwrap();
    assert_eq!(ckpt.epochs_done, 3);
    assert_eq!(ckpt.history.len(), 3);
    resumed
        .fit(&data(), fit().initial_epoch(ckpt.epochs_done))
        .unwrap();
    assert_eq!(weights(&straight), weights(&resumed));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn early_stopping_stops_and_restores_the_best_weights() {
    // SGD with a huge learning rate diverges after the first epoch: val_loss only gets worse.
    let x = Input::new([64]);
    let y = Dense::new(10).apply(&x).unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.compile(
        Compile::new(Sgd::new(5.0)).loss(SparseCategoricalCrossentropy::new().from_logits(true)),
    )
    .unwrap();
    let best: Arc<Mutex<Vec<Vec<f32>>>> = Arc::new(Mutex::new(Vec::new()));
    struct Recorder(Arc<Mutex<Vec<Vec<f32>>>>, f64);
    impl Callback for Recorder {
        fn on_epoch_end(
            &mut self,
            _e: usize,
            logs: &mut Logs,
            model: &mut Model,
        ) -> kiln::Result<Control> {
            let v = logs.get("val_loss").unwrap();
            if v < self.1 {
                self.1 = v;
                *self.0.lock().unwrap() = model
                    .weights()
                    .iter()
                    .map(|w| w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                    .collect();
            }
            Ok(Control::Continue)
        }
    }
    let stopper = Arc::new(Mutex::new(
        EarlyStopping::new("val_loss")
            .patience(1)
            .restore_best_weights(true),
    ));
    let h = m
        .fit(
            &data(),
            Fit::new()
                .epochs(30)
                .validation_split(0.25)
                .quiet()
                .callback(Recorder(best.clone(), f64::INFINITY))
                .shared_callback(stopper.clone()),
        )
        .unwrap();
    let stopped = stopper
        .lock()
        .unwrap()
        .stopped_epoch
        .expect("stopped early");
    assert_eq!(h.epochs.len(), stopped + 1);
    assert!(h.epochs.len() < 30);
    assert_eq!(weights(&m), *best.lock().unwrap());
}

#[test]
fn schedules_and_plateaus_set_the_learning_rate() {
    let mut m = model(3);
    let h = m
        .fit(
            &data(),
            Fit::new()
                .epochs(4)
                .quiet()
                .callback(LearningRateScheduler::new(Schedule::Step {
                    initial: 0.1,
                    factor: 0.5,
                    every: 2,
                })),
        )
        .unwrap();
    assert_eq!(h.get("learning_rate").unwrap(), vec![0.1, 0.1, 0.05, 0.05]);

    // A monitored value that never improves: the rate drops every `patience` epochs.
    struct Flat;
    impl Callback for Flat {
        fn on_epoch_end(
            &mut self,
            _e: usize,
            logs: &mut Logs,
            _m: &mut Model,
        ) -> kiln::Result<Control> {
            logs.set("flat", 1.0);
            Ok(Control::Continue)
        }
    }
    let mut m = model(3);
    m.set_learning_rate(0.01).unwrap();
    let h = m
        .fit(
            &data(),
            Fit::new()
                .epochs(5)
                .quiet()
                .callback(Flat)
                .callback(ReduceLROnPlateau::new("flat").factor(0.5).patience(2)),
        )
        .unwrap();
    assert_eq!(
        h.get("learning_rate").unwrap(),
        vec![0.01, 0.01, 0.005, 0.005, 0.0025]
    );
    let cos = Schedule::Cosine {
        initial: 1.0,
        decay_epochs: 4,
        alpha: 0.1,
    };
    assert_eq!(cos.learning_rate(0), 1.0);
    assert!((cos.learning_rate(4) - 0.1).abs() < 1e-12);
    let exp = Schedule::Exponential {
        initial: 1.0,
        rate: 0.5,
        decay_epochs: 2.0,
    };
    assert!((exp.learning_rate(3) - 0.5f64.powf(1.5)).abs() < 1e-12);
}

#[test]
fn terminate_on_nan_stops_at_the_first_bad_batch() {
    let x = Input::new([1]);
    let y = Dense::new(1).apply(&x).unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.compile(Compile::new(Sgd::new(1e30)).loss("mse")).unwrap();
    let xs = Tensor::new(&[[1e10f32]; 64], &Device::Cpu).unwrap();
    let ys = Tensor::new(&[[1f32]; 64], &Device::Cpu).unwrap();
    let guard = Arc::new(Mutex::new(TerminateOnNaN::default()));
    let h = m
        .fit(
            &Dataset::new(xs, ys).unwrap(),
            Fit::new()
                .epochs(5)
                .batch_size(4)
                .quiet()
                .shared_callback(guard.clone()),
        )
        .unwrap();
    assert_eq!(h.epochs.len(), 1);
    assert!(guard.lock().unwrap().stopped_at_batch.is_some());
}

#[test]
fn csv_logger_writes_every_epoch() {
    let dir = temp_dir("csv");
    let path = dir.join("log.csv");
    let mut m = model(4);
    let h = m
        .fit(
            &data(),
            Fit::new()
                .epochs(3)
                .validation_split(0.2)
                .quiet()
                .callback(CsvLogger::new(&path)),
        )
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Every value of the logs, the epoch's duration included (kiln's addition to Keras' logs).
    assert_eq!(lines[0], "epoch,loss,val_loss,epoch_time_s");
    assert_eq!(lines.len(), 4);
    let time: f64 = lines[3].split(',').nth(3).unwrap().parse().unwrap();
    assert_eq!(time, h.epochs[2].get("epoch_time_s").unwrap());
    assert!(time > 0.0);
    let last_loss: f64 = lines[3].split(',').nth(1).unwrap().parse().unwrap();
    assert_eq!(last_loss, h.epochs[2].get("loss").unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes a scripted value into the logs each epoch, for callbacks to monitor.
struct Scripted(Vec<f64>);
impl Callback for Scripted {
    fn on_epoch_end(&mut self, e: usize, logs: &mut Logs, _m: &mut Model) -> kiln::Result<Control> {
        logs.set("score", self.0[e]);
        Ok(Control::Continue)
    }
}

#[test]
fn early_stopping_counts_patience_as_keras_3() {
    // tests/fixtures/keras/early_stopping.json: Keras 3.15.1's EarlyStopping on the same
    // scripted values (make_early_stopping_cases.py).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras/early_stopping.json"
    );
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let scores: Vec<f64> = serde_json::from_value(case["scores"].clone()).unwrap();
        let patience = case["patience"].as_u64().unwrap() as usize;
        let expected = case["epochs_run"].as_u64().unwrap() as usize;
        let mut m = model(1);
        let h = m
            .fit(
                &data(),
                Fit::new()
                    .epochs(scores.len())
                    .quiet()
                    .callback(Scripted(scores.clone()))
                    .callback(
                        EarlyStopping::new("score")
                            .mode(Mode::Min)
                            .patience(patience),
                    ),
            )
            .unwrap();
        assert_eq!(
            h.epochs.len(),
            expected,
            "scores {scores:?}, patience {patience}"
        );
    }
}

#[test]
fn early_stopping_restores_the_best_weights_when_training_runs_to_its_end() {
    // Keras 3 restores the best epoch's weights at the end of training even without a stop.
    let best: Arc<Mutex<Vec<Vec<f32>>>> = Arc::new(Mutex::new(Vec::new()));
    struct KeepSecond(Arc<Mutex<Vec<Vec<f32>>>>);
    impl Callback for KeepSecond {
        fn on_epoch_end(
            &mut self,
            e: usize,
            _l: &mut Logs,
            m: &mut Model,
        ) -> kiln::Result<Control> {
            if e == 1 {
                *self.0.lock().unwrap() = weights(m);
            }
            Ok(Control::Continue)
        }
    }
    let mut m = model(2);
    m.fit(
        &data(),
        Fit::new()
            .epochs(4)
            .quiet()
            .callback(Scripted(vec![3.0, 1.0, 2.0, 2.5]))
            .callback(KeepSecond(best.clone()))
            .callback(
                EarlyStopping::new("score")
                    .mode(Mode::Min)
                    .patience(10)
                    .restore_best_weights(true),
            ),
    )
    .unwrap();
    let kept = best.lock().unwrap().clone();
    assert!(!kept.is_empty());
    assert_eq!(weights(&m), kept);
}

/// The learning-rate callbacks log under Keras 3's key, `learning_rate` (what
/// tests/fixtures/keras/check_lr_history_key.py finds real Keras 3.15 writing into History and
/// CSVLogger's columns), never `lr`.
#[test]
fn the_learning_rate_is_logged_as_keras_3_logs_it() {
    let dir = temp_dir("lr-key");
    let path = dir.join("log.csv");
    let mut m = model(5);
    m.set_learning_rate(0.01).unwrap();
    let h = m
        .fit(
            &data(),
            Fit::new()
                .epochs(3)
                .quiet()
                .callback(Scripted(vec![1.0, 1.0, 1.0]))
                .callback(ReduceLROnPlateau::new("score").factor(0.5).patience(1))
                .callback(CsvLogger::new(&path)),
        )
        .unwrap();
    assert_eq!(h.get("learning_rate").unwrap(), vec![0.01, 0.005, 0.0025]);
    assert!(h.get("lr").is_none());
    let text = std::fs::read_to_string(&path).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    assert!(header.contains(&"learning_rate"), "{header:?}");
    assert!(!header.contains(&"lr"), "{header:?}");
    let column = header.iter().position(|c| *c == "learning_rate").unwrap();
    let last: f64 = text
        .lines()
        .nth(3)
        .unwrap()
        .split(',')
        .nth(column)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(last, 0.0025);
    std::fs::remove_dir_all(&dir).ok();
}
