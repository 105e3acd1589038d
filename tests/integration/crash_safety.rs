//! A run folder survives `kill -9` at any point: a resumed run ends with the files of an unbroken
//! one, byte for byte. Resume refuses checkpoints of another run, damaged or altered files, and
//! folders in use; the command's paths (train, evaluate, predict) agree on seed, held-out rows
//! and data preparation.

use std::path::Path;
use std::process::{Command, Stdio};

fn kiln(args: &[&str], dir: &Path) -> (bool, String, String) {
    kiln_env(args, dir, &[])
}

fn kiln_env(args: &[&str], dir: &Path, env: &[(&str, String)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args).current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn temp(name: &str) -> std::path::PathBuf {
    crate::support::temp("crash", name)
}

/// Two features, label = x0 + x1 > 0, every value multiplied by `factor`.
fn write_points(path: &Path, rows: usize, factor: f64) {
    let mut text = String::from("a,b,label\n");
    for i in 0..rows {
        let a = ((i * 37) % 101) as f64 / 50.0 - 1.0;
        let b = ((i * 53) % 97) as f64 / 48.0 - 1.0;
        let label = if a + b > 0.0 { 1 } else { 0 };
        text.push_str(&format!("{},{},{label}\n", a * factor, b * factor));
    }
    std::fs::write(path, text).unwrap();
}

/// Early stopping with best weights, a best-checkpoint, a plateau and dropout: every kind of
/// state a resume must restore.
const RUN: &str = r#"
seed = 5
[data]
source = "csv"
path = "points.csv"
label_columns = ["label"]
test_split = 0.2

[model]
layers = [
  { type = "dense", name = "hidden", units = 16, activation = "relu" },
  { type = "dropout", rate = 0.2 },
  { type = "dense", name = "out", units = 1 },
]

[compile]
optimizer = { type = "adam", learning_rate = 0.01 }
loss = { type = "binary_crossentropy", from_logits = true }
metrics = ["accuracy"]

[fit]
epochs = 5
batch_size = 32
validation_split = 0.2
callbacks = [
  { type = "early_stopping", monitor = "val_loss", patience = 1, restore_best_weights = true },
  { type = "reduce_lr_on_plateau", monitor = "val_loss", factor = 0.5, patience = 1 },
  { type = "model_checkpoint", monitor = "val_loss" },
]
"#;

const FINAL_FILES: [&str; 3] = ["model.safetensors", "history.json", "history.csv"];

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

/// A final file's bytes, without what a clock decides: the history's `epoch_time_s` (its key in
/// history.json, its column in history.csv) differs between any two runs.
fn deterministic(dir: &Path, name: &str) -> Vec<u8> {
    let bytes = read(dir, name);
    match name {
        "history.json" => {
            let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let times = v.as_object_mut().unwrap().remove("epoch_time_s");
            assert!(times.is_some(), "{name} records epoch_time_s");
            serde_json::to_vec(&v).unwrap()
        }
        "history.csv" => {
            let text = String::from_utf8(bytes).unwrap();
            let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
            let col = header.iter().position(|c| *c == "epoch_time_s");
            let col = col.unwrap_or_else(|| panic!("{name} has no epoch_time_s column"));
            text.lines()
                .map(|l| {
                    let mut cells: Vec<&str> = l.split(',').collect();
                    cells.remove(col);
                    cells.join(",") + "\n"
                })
                .collect::<String>()
                .into_bytes()
        }
        _ => bytes,
    }
}

fn assert_same_final_files(reference: &Path, other: &Path, what: &str) {
    for f in FINAL_FILES {
        assert!(
            deterministic(reference, f) == deterministic(other, f),
            "{what}: {f} differs from the unbroken run's (epoch_time_s aside)"
        );
    }
}

#[test]
fn a_run_killed_after_any_file_operation_resumes_to_the_unbroken_result() {
    let dir = temp("every-op");
    write_points(&dir.join("points.csv"), 300, 1.0);
    std::fs::write(dir.join("run.toml"), RUN).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--out", "full"], &dir);
    assert!(ok, "{err}");
    let full = dir.join("full");
    let mut killed = 0;
    for k in 1.. {
        let out = format!("k{k}");
        let (ok, _, _) = kiln_env(
            &["train", "run.toml", "--quiet", "--out", &out],
            &dir,
            &[("KILN_ABORT_AFTER_FILE_OPS", k.to_string())],
        );
        if ok {
            // k is past the run's last file operation: an unbroken run.
            assert_same_final_files(&full, &dir.join(&out), "a run never stopped");
            break;
        }
        killed += 1;
        let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--resume", &out], &dir);
        assert!(ok, "resume after file operation {k}: {err}");
        assert_same_final_files(
            &full,
            &dir.join(&out),
            &format!("killed after operation {k}"),
        );
        let leftovers: Vec<String> = std::fs::read_dir(dir.join(&out).join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "stale temporaries after resume: {leftovers:?}"
        );
        std::fs::remove_dir_all(dir.join(&out)).ok();
    }
    // model.json, the checkpoints of every epoch (last and best) and the five final files.
    assert!(killed >= 15, "only {killed} kill points");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_run_killed_at_random_moments_resumes_to_the_unbroken_result() {
    let dir = temp("sigkill");
    write_points(&dir.join("points.csv"), 3000, 1.0);
    let run = RUN
        .replace("epochs = 5", "epochs = 8")
        .replace("patience = 1, restore", "patience = 3, restore");
    std::fs::write(dir.join("run.toml"), run).unwrap();
    let started = std::time::Instant::now();
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--out", "full"], &dir);
    assert!(ok, "{err}");
    let unbroken = started.elapsed();
    let full = dir.join("full");
    // Kill moments spread over the run's length (a fixed sequence: the test is repeatable in
    // what it asks, if not in where each kill lands).
    for (trial, fraction) in [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95].iter().enumerate() {
        let out = format!("t{trial}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["train", "run.toml", "--quiet", "--out", &out])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(unbroken.mul_f64(*fraction));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--resume", &out], &dir);
        if !dir.join(&out).exists() {
            // Killed before the run created its folder (an early kill on a loaded machine):
            // nothing to resume, which resume says, and the run started again is unbroken.
            assert!(
                !ok && err.contains("no such run folder") && err.contains("without --resume"),
                "resume of trial {trial} without a folder: {err}"
            );
            let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--out", &out], &dir);
            assert!(ok, "trial {trial} started again: {err}");
        } else {
            assert!(ok, "resume of trial {trial}: {err}");
        }
        assert_same_final_files(&full, &dir.join(&out), &format!("SIGKILL trial {trial}"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resume_refuses_another_run_a_damaged_checkpoint_and_a_folder_in_use() {
    let dir = temp("refuse");
    write_points(&dir.join("points.csv"), 300, 1.0);
    std::fs::write(dir.join("run.toml"), RUN).unwrap();
    let (ok, _, err) = kiln(
        &[
            "train", "run.toml", "--quiet", "--out", "part", "--epochs", "2",
        ],
        &dir,
    );
    assert!(ok, "{err}");

    // Another experiment: same shapes, other loss or activation, other seed, other data.
    let others = [
        (
            RUN.replace(
                "type = \"binary_crossentropy\", from_logits = true",
                "type = \"mse\"",
            ),
            "compile.loss",
        ),
        (
            RUN.replace("activation = \"relu\"", "activation = \"tanh\""),
            "model.layers[0].activation",
        ),
        (RUN.replace("seed = 5", "seed = 6"), "seed"),
        (
            RUN.replace("batch_size = 32", "batch_size = 16"),
            "fit.batch_size",
        ),
    ];
    for (i, (text, key)) in others.iter().enumerate() {
        let name = format!("other{i}.toml");
        std::fs::write(dir.join(&name), text).unwrap();
        let (ok, _, err) = kiln(&["train", &name, "--quiet", "--resume", "part"], &dir);
        assert!(
            !ok && err.contains("cannot resume from part") && err.contains(key),
            "{key}: {err}"
        );
    }
    let (ok, _, err) = kiln(
        &[
            "train", "run.toml", "--quiet", "--resume", "part", "--seed", "9",
        ],
        &dir,
    );
    assert!(!ok && err.contains("`seed`"), "{err}");
    // A seed given when training is remembered by the folder.
    let (ok, _, err) = kiln(
        &[
            "train", "run.toml", "--quiet", "--out", "seeded", "--seed", "9", "--epochs", "1",
        ],
        &dir,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = kiln(
        &["train", "run.toml", "--quiet", "--resume", "seeded"],
        &dir,
    );
    assert!(ok && err.contains("resumed seeded at epoch 1"), "{err}");
    write_points(&dir.join("points2.csv"), 300, 1.5);
    std::fs::write(dir.join("points.csv.bak"), read(&dir, "points.csv")).unwrap();
    std::fs::write(dir.join("points.csv"), read(&dir, "points2.csv")).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--resume", "part"], &dir);
    assert!(!ok && err.contains("data_content"), "changed data: {err}");
    std::fs::write(dir.join("points.csv"), read(&dir, "points.csv.bak")).unwrap();

    // A flipped byte in the weights, or a tensor removed from the file.
    let ckpt = dir.join("part/checkpoints/last.safetensors");
    let good = std::fs::read(&ckpt).unwrap();
    let mut flipped = good.clone();
    let at = flipped.len() - 3;
    flipped[at] ^= 0x40;
    std::fs::write(&ckpt, &flipped).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--resume", "part"], &dir);
    assert!(
        !ok && err.contains("last.safetensors") && err.contains("checksum"),
        "{err}"
    );
    let st = safetensors::SafeTensors::deserialize(&good).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&good).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("optimizer/m/"))
        .collect();
    assert!(kept.len() < st.len(), "the checkpoint has Adam moments");
    let without = safetensors::serialize(kept, header.metadata().clone()).unwrap();
    std::fs::write(&ckpt, without).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--resume", "part"], &dir);
    assert!(
        !ok && err.contains("optimizer/m/") && err.contains("missing"),
        "{err}"
    );
    std::fs::write(&ckpt, &good).unwrap();

    // A folder another live process trains into.
    write_points(&dir.join("big.csv"), 20000, 1.0);
    std::fs::write(
        dir.join("long.toml"),
        RUN.replace("points.csv", "big.csv")
            .replace("epochs = 5", "epochs = 400")
            .replace("patience = 1, restore", "patience = 1000, restore"),
    )
    .unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "long.toml", "--quiet", "--out", "busy"])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = dir.join("busy/.kiln.lock");
    let waited = std::time::Instant::now();
    while std::fs::read_to_string(&lock).map_or(true, |s| s.is_empty()) {
        assert!(
            waited.elapsed().as_secs() < 60,
            "the first run never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--out", "busy"], &dir);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        !ok && err.contains("busy") && err.contains("in use"),
        "{err}"
    );
    // The killed process's lock is gone with it.
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--out", "busy"], &dir);
    assert!(ok, "a dead process's lock must not block: {err}");

    // Resuming a finished run says so and changes nothing.
    let before = read(&dir, "busy/model.safetensors");
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--resume", "busy"], &dir);
    assert!(ok && err.contains("already finished"), "{err}");
    assert!(before == read(&dir, "busy/model.safetensors"));
    // And `--resume DIR` alone continues the run file the folder recorded.
    let (ok, _, err) = kiln(&["train", "--quiet", "--resume", "busy"], &dir);
    assert!(ok && err.contains("already finished"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

fn held_out_accuracy(stdout: &str) -> f64 {
    stdout
        .split("held-out:")
        .nth(1)
        .and_then(|s| s.lines().find(|l| l.trim_start().starts_with("accuracy")))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no held-out accuracy in {stdout}"))
        .parse()
        .unwrap()
}

#[test]
fn the_seed_option_works_and_evaluate_uses_the_rows_training_held_out() {
    let dir = temp("seed");
    for seed in ["0", "7"] {
        let out = format!("s{seed}");
        let (ok, stdout, err) = kiln(
            &[
                "train", "--seed", seed, "--epochs", "3", "--quiet", "--out", &out,
            ],
            &dir,
        );
        assert!(ok, "--seed {seed}: {err}");
        let trained = held_out_accuracy(&stdout);
        // The run folder alone, and its model.json with the weights.
        let (ok, json, err) = kiln(&["evaluate", &out, "--json"], &dir);
        assert!(ok, "{err}");
        let logs: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        let evaluated = logs["accuracy"].as_f64().unwrap();
        assert!(
            (evaluated - trained).abs() < 5e-7,
            "seed {seed}: {evaluated} vs {trained}"
        );
        let model_json = format!("{out}/model.json");
        let weights = format!("{out}/model.safetensors");
        let (ok, json, err) = kiln(
            &["evaluate", &model_json, "--weights", &weights, "--json"],
            &dir,
        );
        assert!(ok, "{err}");
        let again: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(again, logs);
        let record: serde_json::Value = serde_json::from_slice(&read(&dir, &model_json)).unwrap();
        assert_eq!(record["seed"].as_u64(), Some(seed.parse().unwrap()));
        assert_eq!(record["data"]["test_rows"].as_array().unwrap().len(), 359);
    }
    let rows = |s: &str| -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&read(&dir, &format!("{s}/model.json")))
            .unwrap()["data"]["test_rows"]
            .clone()
    };
    assert_ne!(rows("s0"), rows("s7"), "another seed holds out other rows");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn evaluate_and_predict_prepare_data_as_training_did() {
    // The CSV holds values a thousand times too small; the run scales them back.
    let dir = temp("prep");
    write_points(&dir.join("tiny.csv"), 400, 1e-3);
    let run = RUN
        .replace("points.csv", "tiny.csv")
        .replace("test_split = 0.2", "test_split = 0.2\nscale = 1000.0")
        .replace("epochs = 5", "epochs = 12")
        .replace("patience = 1, restore", "patience = 100, restore");
    std::fs::write(dir.join("run.toml"), &run).unwrap();
    let (ok, stdout, err) = kiln(&["train", "run.toml", "--quiet", "--out", "r"], &dir);
    assert!(ok, "{err}");
    assert!(held_out_accuracy(&stdout) > 0.85, "{stdout}");
    // evaluate --data needs only the model and that file: the training data may be gone.
    std::fs::rename(dir.join("tiny.csv"), dir.join("moved.csv")).unwrap();
    let (ok, json, err) = kiln(&["evaluate", "r", "--data", "moved.csv", "--json"], &dir);
    assert!(ok, "{err}");
    let logs: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert!(
        logs["accuracy"].as_f64().unwrap() > 0.85,
        "the file must be scaled as the training data were: {logs}"
    );
    // Labels under another name: --labels names them.
    let text = std::fs::read_to_string(dir.join("moved.csv")).unwrap();
    std::fs::write(dir.join("renamed.csv"), text.replacen("label", "y", 1)).unwrap();
    let (ok, _, err) = kiln(&["evaluate", "r", "--data", "renamed.csv"], &dir);
    assert!(!ok && err.contains("no column named `label`"), "{err}");
    let (ok, _, err) = kiln(
        &["evaluate", "r", "--data", "renamed.csv", "--labels", "y"],
        &dir,
    );
    assert!(ok, "{err}");
    // predict scales its inputs too: a clearly positive and a clearly negative point.
    std::fs::write(dir.join("x.csv"), "a,b\n0.0008,0.0008\n-0.0008,-0.0008\n").unwrap();
    let (ok, _, err) = kiln(
        &["predict", "r", "--input", "x.csv", "--output", "p.csv"],
        &dir,
    );
    assert!(ok, "{err}");
    let p = std::fs::read_to_string(dir.join("p.csv")).unwrap();
    let lines: Vec<&str> = p.lines().collect();
    let (pos, neg): (f64, f64) = (lines[1].parse().unwrap(), lines[2].parse().unwrap());
    assert!(pos > 1.0 && neg < -1.0, "logits {pos} {neg}");
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(unix)]
#[test]
fn every_file_of_a_run_folder_has_the_same_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp("modes");
    let (ok, _, err) = kiln(&["train", "--quiet", "--epochs", "1", "--out", "r"], &dir);
    assert!(ok, "{err}");
    let mode = |p: &str| {
        std::fs::metadata(dir.join("r").join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let expected = mode("model.json");
    for f in [
        "model.safetensors",
        "history.json",
        "history.csv",
        "loss.svg",
        "loss.png",
        "checkpoints/last.safetensors",
    ] {
        assert_eq!(mode(f), expected, "{f}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// With gradient diagnostics on, on the training and the validation data (an L2 penalty and
/// FGSM beside the data loss: three terms), the history holds each term's gradient norm and
/// every pair's cosine with their `val_` twins, the run folder their plots (the validation
/// ones dashed beside them), the epoch line the norms only; a run killed at several of its file operations
/// resumes to the same files, diagnostics included, byte for byte. Diagnostics do not change
/// what is learned: the weights are those of the same run with them off.
#[test]
fn gradient_diagnostics_survive_kill_and_resume() {
    let dir = temp("diagnostics");
    write_points(&dir.join("points.csv"), 300, 1.0);
    let with_terms = RUN.replace(
        "activation = \"relu\" }",
        "activation = \"relu\", kernel_regularizer = { l2 = 1e-3 } }",
    ) + "\n[[added]]\nkind = \"fgsm\"\nepsilon = 0.05\nmultiplier = 0.5\n";
    let on = with_terms.replace(
        "batch_size = 32",
        "batch_size = 32\ngradient_diagnostics = true\nvalidation_gradient_diagnostics = true",
    );
    std::fs::write(dir.join("run.toml"), &on).unwrap();
    std::fs::write(dir.join("off.toml"), &with_terms).unwrap();
    let (ok, stdout, err) = kiln(&["train", "run.toml", "--out", "full"], &dir);
    assert!(ok, "{err}");
    let printed = stdout + &err;
    let full = dir.join("full");
    let history: serde_json::Value = serde_json::from_slice(&read(&full, "history.json")).unwrap();
    let keys: Vec<&str> = history
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "grad_norm/out_loss",
        "grad_norm/l2",
        "grad_norm/adversarial",
        "grad_cos/out_loss/l2",
        "grad_cos/out_loss/adversarial",
        "grad_cos/l2/adversarial",
    ] {
        assert!(keys.contains(&key), "history.json lacks {key}: {keys:?}");
        let val = format!("val_{key}");
        assert!(
            keys.contains(&val.as_str()),
            "history.json lacks {val}: {keys:?}"
        );
    }
    let val_norms = history["val_grad_norm/adversarial"].as_array().unwrap();
    assert!(
        val_norms.iter().all(|v| v.as_f64().unwrap() > 0.0),
        "{val_norms:?}"
    );
    let norms = history["grad_norm/out_loss"].as_array().unwrap();
    assert!(norms.iter().all(|v| v.as_f64().unwrap() > 0.0), "{norms:?}");
    let cosines = history["grad_cos/out_loss/adversarial"].as_array().unwrap();
    assert!(cosines
        .iter()
        .all(|v| v.as_f64().unwrap().abs() <= 1.0 + 1e-12));
    let header = String::from_utf8(read(&full, "history.csv")).unwrap();
    assert!(header
        .lines()
        .next()
        .unwrap()
        .contains("grad_cos/l2/adversarial"));
    for plot in [
        "grad_norm.png",
        "grad_norm.svg",
        "grad_cos.png",
        "grad_cos.svg",
    ] {
        assert!(full.join(plot).exists(), "no {plot}");
    }
    let svg = String::from_utf8(read(&full, "grad_norm.svg")).unwrap();
    assert!(
        svg.contains("val_grad_norm/l2"),
        "no validation norm in grad_norm.svg"
    );
    let svg = String::from_utf8(read(&full, "grad_cos.svg")).unwrap();
    assert!(
        svg.contains("val_grad_cos/l2/adversarial"),
        "no validation cosine in grad_cos.svg"
    );
    let line = printed.lines().find(|l| l.starts_with("Epoch 1/")).unwrap();
    assert!(
        line.contains(" grad_norm/l2: ")
            && line.contains("val_grad_norm/l2: ")
            && !line.contains("grad_cos"),
        "{line}"
    );
    let (ok, _, err) = kiln(&["train", "off.toml", "--quiet", "--out", "off"], &dir);
    assert!(ok, "{err}");
    assert_eq!(
        read(&full, "model.safetensors"),
        read(&dir.join("off"), "model.safetensors")
    );
    for k in [2, 5, 9, 14] {
        let out = format!("k{k}");
        let (ok, _, _) = kiln_env(
            &["train", "run.toml", "--quiet", "--out", &out],
            &dir,
            &[("KILN_ABORT_AFTER_FILE_OPS", k.to_string())],
        );
        assert!(!ok, "the run outlived file operation {k}");
        let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--resume", &out], &dir);
        assert!(ok, "resume after file operation {k}: {err}");
        assert_same_final_files(
            &full,
            &dir.join(&out),
            &format!("killed after operation {k}"),
        );
    }
    // Resuming with diagnostics switched is another run.
    let (ok, _, err) = kiln(&["train", "off.toml", "--quiet", "--resume", "k2"], &dir);
    assert!(!ok && err.contains("gradient_diagnostics"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A run stopped early with `restore_best_weights` ends with the best epoch's weights; resuming
/// it after it finished (as after a crash between its last checkpoint and its final files)
/// writes those same weights again, not the last epoch's that the checkpoint holds.
#[test]
fn resuming_a_finished_early_stopped_run_keeps_the_restored_best_weights() {
    let dir = temp("stopped-resume");
    write_points(&dir.join("points.csv"), 300, 1.0);
    // A learning rate far too large: the validation loss gets worse after its best epoch.
    let run = RUN
        .replace("learning_rate = 0.01", "learning_rate = 3.0")
        .replace("epochs = 5", "epochs = 30");
    std::fs::write(dir.join("run.toml"), run).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--out", "full"], &dir);
    assert!(ok, "{err}");
    let full = dir.join("full");
    let history: serde_json::Value = serde_json::from_slice(&read(&full, "history.json")).unwrap();
    let val: Vec<f64> = serde_json::from_value(history["val_loss"].clone()).unwrap();
    assert!(val.len() < 30, "stopped early: {val:?}");
    let best = val.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(
        *val.last().unwrap() > best,
        "the last epoch is not the best: {val:?}"
    );
    let trained = read(&full, "model.safetensors");
    let (ok, _, err) = kiln(&["train", "--resume", "full", "--quiet"], &dir);
    assert!(ok, "{err}");
    assert!(
        read(&full, "model.safetensors") == trained,
        "the resumed run changed the weights"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// RUN with an L2 penalty beside the data loss, both weighed by `strategy` (a run-file value
/// of `loss_weighting`), and gradient diagnostics on the training and the validation data.
fn weighted_run(strategy: &str) -> String {
    RUN.replace(
        "activation = \"relu\" }",
        "activation = \"relu\", kernel_regularizer = { l2 = 1e-3 } }",
    )
    .replace(
        "[compile]\n",
        &format!("[compile]\nloss_weighting = {{ type = \"{strategy}\", added_terms = true }}\n"),
    )
    .replace(
        "batch_size = 32",
        "batch_size = 32\ngradient_diagnostics = true\nvalidation_gradient_diagnostics = true",
    )
}

/// Every loss weighting strategy, through the CLI: a `kiln train` killed with SIGKILL at
/// moments spread over the run, and one stopped after several of its file operations, each
/// `--resume`d, ends with the unbroken run's files byte for byte (weights, history with the
/// weights and the diagnostics of both data sets, the strategy's state in model.safetensors).
#[test]
fn loss_weighting_survives_kill_9_and_resume() {
    let dir = temp("weighting-kill");
    write_points(&dir.join("points.csv"), 3000, 1.0);
    for strategy in ["uncertainty", "dwa", "famo", "pcgrad", "gradnorm"] {
        let file = format!("{strategy}.toml");
        let run = weighted_run(strategy)
            .replace("epochs = 5", "epochs = 6")
            .replace("patience = 1, restore", "patience = 3, restore");
        std::fs::write(dir.join(&file), run).unwrap();
        let full = format!("{strategy}-full");
        let started = std::time::Instant::now();
        let (ok, _, err) = kiln(&["train", &file, "--quiet", "--out", &full], &dir);
        assert!(ok, "{strategy}: {err}");
        let unbroken = started.elapsed();
        let full = dir.join(full);
        let history: serde_json::Value =
            serde_json::from_slice(&read(&full, "history.json")).unwrap();
        for key in [
            "loss_weight/out_loss",
            "loss_weight/l2",
            "grad_norm/l2",
            "grad_cos/out_loss/l2",
            "val_grad_norm/out_loss",
        ] {
            assert!(history.get(key).is_some(), "{strategy}: no {key}");
        }
        let mut interrupted = 0;
        for (trial, fraction) in [0.25, 0.6, 0.9].iter().enumerate() {
            let out = format!("{strategy}-t{trial}");
            // The unbroken run's time is only a guide (the other tests share the cores): a run
            // that finished before its kill is run again, killed sooner.
            let mut delay = unbroken.mul_f64(*fraction);
            for _attempt in 0..4 {
                let _ = std::fs::remove_dir_all(dir.join(&out));
                let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
                    .args(["train", &file, "--quiet", "--out", &out])
                    .current_dir(&dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                std::thread::sleep(delay);
                let running = child.try_wait().unwrap().is_none();
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                if running {
                    interrupted += 1;
                    break;
                }
                delay = delay.mul_f64(0.5);
            }
            let (ok, _, err) = kiln(&["train", &file, "--quiet", "--resume", &out], &dir);
            assert!(ok, "{strategy}: resume of trial {trial}: {err}");
            assert_same_final_files(
                &full,
                &dir.join(&out),
                &format!("{strategy}: SIGKILL trial {trial}"),
            );
        }
        assert!(
            interrupted >= 2,
            "{strategy}: only {interrupted} kills landed mid-run"
        );
        for k in [4, 9] {
            let out = format!("{strategy}-k{k}");
            let (ok, _, _) = kiln_env(
                &["train", &file, "--quiet", "--out", &out],
                &dir,
                &[("KILN_ABORT_AFTER_FILE_OPS", k.to_string())],
            );
            assert!(!ok, "{strategy}: the run outlived file operation {k}");
            let (ok, _, err) = kiln(&["train", &file, "--quiet", "--resume", &out], &dir);
            assert!(ok, "{strategy}: resume after file operation {k}: {err}");
            assert_same_final_files(
                &full,
                &dir.join(&out),
                &format!("{strategy}: killed after operation {k}"),
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A held-out value `key` from `kiln train`'s report.
fn held_out(stdout: &str, key: &str) -> f64 {
    stdout
        .split("held-out:")
        .nth(1)
        .and_then(|s| s.lines().find(|l| l.split_whitespace().next() == Some(key)))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no held-out {key} in {stdout}"))
        .parse()
        .unwrap()
}

/// `kiln evaluate RUN_DIR` of a run trained with a strategy weighs the terms with the
/// strategy's state at the end of training (saved in model.safetensors), not a fresh one:
/// its `loss` is Σ (last epoch's `loss_weight/<term>`) · term (for DWA, the weights its last
/// epoch set for the next), and agrees with the held-out loss `kiln train` reported from the
/// trained model in memory.
#[test]
fn evaluate_uses_the_trained_strategy_state() {
    let dir = temp("weighting-evaluate");
    write_points(&dir.join("points.csv"), 300, 1.0);
    for strategy in ["uncertainty", "dwa", "famo", "pcgrad", "gradnorm"] {
        let file = format!("{strategy}.toml");
        std::fs::write(dir.join(&file), weighted_run(strategy)).unwrap();
        let (ok, stdout, err) = kiln(&["train", &file, "--out", strategy], &dir);
        assert!(ok, "{strategy}: {err}");
        let (ok, json, err) = kiln(&["evaluate", strategy, "--json"], &dir);
        assert!(ok, "{strategy}: {err}");
        assert!(!err.contains("no loss weighting state"), "{err}");
        let logs: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        let history: serde_json::Value =
            serde_json::from_slice(&read(&dir.join(strategy), "history.json")).unwrap();
        let last = |k: &str| {
            history[k]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .as_f64()
                .unwrap()
        };
        let mut w = [last("loss_weight/out_loss"), last("loss_weight/l2")];
        if strategy == "dwa" {
            // DWA's state at the end holds the weights of the epoch that would come next:
            // 2·softmax(r / 2), r the last two epochs' ratios of the terms' means.
            let ratio = |k: &str| {
                let v = history[k].as_array().unwrap();
                let n = v.len();
                v[n - 1].as_f64().unwrap() / v[n - 2].as_f64().unwrap()
            };
            let e = [(ratio("out_loss") / 2.0).exp(), (ratio("l2") / 2.0).exp()];
            w = [2.0 * e[0] / (e[0] + e[1]), 2.0 * e[1] / (e[0] + e[1])];
        }
        if strategy != "pcgrad" {
            assert!(
                w.iter().any(|w| (w - 1.0).abs() > 1e-3),
                "{strategy}: {w:?}"
            );
        }
        let terms = [
            logs["out_loss"].as_f64().unwrap(),
            logs["l2"].as_f64().unwrap(),
        ];
        let want = w[0] * terms[0] + w[1] * terms[1];
        let loss = logs["loss"].as_f64().unwrap();
        assert!(
            (loss - want).abs() <= 1e-6 * want.abs(),
            "{strategy}: evaluate's loss {loss}, trained weights give {want}"
        );
        let reported = held_out(&stdout, "loss");
        assert!(
            (loss - reported).abs() < 5e-7 + 1e-6 * reported.abs(),
            "{strategy}: evaluate {loss}, train's held-out {reported}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
