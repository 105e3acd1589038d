//! `mpirun -np N kiln train` as a user runs it (the `mpi` feature and Open MPI's `mpirun`):
//! the same weights as one process, rank 0 alone writing the run folder, a killed rank or bad
//! data on one rank ending the run on every rank, and `--resume` after it.
//!
//! Without the feature or without `mpirun` these tests say so and pass, unless
//! `KILN_REQUIRE_MPI=1` (CI's `.ci/mpi-tests`), which turns "absent" into a failure.

use super::support::temp;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const RUN: &str = r#"
seed = 5
[data]
source = "digits"
test_split = 0.2

[model]
layers = [
  { type = "dense", name = "hidden", units = 32, activation = "relu", kernel_regularizer = { l2 = 1e-4 } },
  { type = "dense", name = "out", units = 10 },
]

[compile]
optimizer = { type = "sgd", learning_rate = 0.05, momentum = 0.9 }
loss = { type = "sparse_categorical_crossentropy", from_logits = true }
metrics = ["accuracy"]

[fit]
epochs = 6
batch_size = 60
validation_split = 0.1
"#;

/// Whether MPI tests can run here; when not, why (and a failure under `KILN_REQUIRE_MPI=1`).
fn mpi_available() -> bool {
    let why = if !cfg!(feature = "mpi") {
        "kiln was built without the `mpi` feature (cargo test --features mpi)"
    } else if !matches!(
        Command::new("mpirun").arg("--version").output(),
        Ok(o) if o.status.success()
    ) {
        "mpirun was not found (apt-get install openmpi-bin libopenmpi-dev)"
    } else {
        return true;
    };
    if std::env::var("KILN_REQUIRE_MPI").as_deref() == Ok("1") {
        panic!("KILN_REQUIRE_MPI=1 but {why}");
    }
    eprintln!("skipped: {why}");
    false
}

/// `mpirun -np N` (oversubscribed: this machine may have fewer cores than ranks) running
/// `kiln ARGS` in `dir`, with one compute thread a rank (kiln's products split their work by
/// `RAYON_NUM_THREADS`, so the runs compared must have the same).
fn mpirun(np: usize, args: &[&str], dir: &Path) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe"])
        .args(["-x", "RAYON_NUM_THREADS=1"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn kiln_alone(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// Waits for `child` at most `limit`; kills it and fails the test when it hangs.
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} hung for more than {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn run_bounded(mut cmd: Command, what: &str) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, Duration::from_secs(240), what)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every tensor of a safetensors file, as f32 values by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn max_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(&b)
        .flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn setup(name: &str) -> PathBuf {
    let dir = temp("mpi", name);
    std::fs::write(dir.join("run.toml"), RUN).unwrap();
    dir
}

/// N = 2 and 3 end within the bound of `distributed.rs` (SGD with momentum, 6 epochs of 12
/// steps: 72 steps) of one process; N = 1 under mpirun writes the very same files as no MPI.
#[test]
fn mpirun_trains_the_weights_of_one_process() {
    if !mpi_available() {
        return;
    }
    let dir = setup("same");
    let alone = kiln_alone(&["train", "run.toml", "--quiet", "--out", "alone"], &dir);
    assert!(alone.status.success(), "{}", text(&alone));
    let one = run_bounded(
        mpirun(1, &["train", "run.toml", "--quiet", "--out", "np1"], &dir),
        "mpirun -np 1",
    );
    assert!(one.status.success(), "{}", text(&one));
    assert_eq!(
        std::fs::read(dir.join("alone/model.safetensors")).unwrap(),
        std::fs::read(dir.join("np1/model.safetensors")).unwrap(),
        "one rank under mpirun differs from no MPI"
    );
    for np in [2, 3] {
        let out = format!("np{np}");
        let o = run_bounded(
            mpirun(np, &["train", "run.toml", "--quiet", "--out", &out], &dir),
            "mpirun -np N",
        );
        assert!(o.status.success(), "np {np}: {}", text(&o));
        // Rank 0 alone printed the report.
        assert_eq!(text(&o).matches("run folder:").count(), 1, "{}", text(&o));
        let diff = max_difference(
            &dir.join("alone/model.safetensors"),
            &dir.join(format!("{out}/model.safetensors")),
        );
        eprintln!("mpirun -np {np}: largest weight difference {diff:.3e}");
        assert!(diff <= 1e-4, "np {np}: {diff}");
        let json = std::fs::read_to_string(dir.join(&out).join("model.json")).unwrap();
        assert!(json.contains("run.toml"));
        assert!(dir.join(&out).join("checkpoints/last.safetensors").exists());
    }
    // Resuming with another number of ranks is refused, naming the difference.
    let o = run_bounded(
        mpirun(3, &["train", "--resume", "np2", "--quiet"], &dir),
        "resume with -np 3",
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("ranks"), "{}", text(&o));
}

/// Run files with random layers (a dropout layer; an LSTM with input dropout, then a dropout
/// layer): `mpirun -np 2` and `-np 3` end within the bound of one process, as models without
/// them do: each sample's masks come from its own stream in the global batch.
#[test]
fn mpirun_with_dropout_trains_the_weights_of_one_process() {
    if !mpi_available() {
        return;
    }
    let dir = setup("dropout");
    let hidden = r#"{ type = "dense", name = "hidden", units = 32, activation = "relu", kernel_regularizer = { l2 = 1e-4 } },"#;
    let runs = [
        (
            "dropout.toml",
            format!("{hidden}\n  {{ type = \"dropout\", rate = 0.3 }},"),
        ),
        (
            "lstm.toml",
            r#"{ type = "reshape", target_shape = [8, 8] },
  { type = "lstm", name = "lstm", units = 16, dropout = 0.25 },
  { type = "dropout", rate = 0.2 },"#
                .to_string(),
        ),
    ];
    for (file, layers) in runs {
        let run = RUN.replace(hidden, &layers);
        assert_ne!(run, RUN);
        std::fs::write(dir.join(file), run).unwrap();
        let alone_out = format!("{file}-alone");
        let alone = kiln_alone(&["train", file, "--quiet", "--out", &alone_out], &dir);
        assert!(alone.status.success(), "{}", text(&alone));
        for np in [2, 3] {
            let out = format!("{file}-np{np}");
            let o = run_bounded(
                mpirun(np, &["train", file, "--quiet", "--out", &out], &dir),
                "mpirun -np N with dropout",
            );
            assert!(o.status.success(), "np {np}: {}", text(&o));
            let diff = max_difference(
                &dir.join(&alone_out).join("model.safetensors"),
                &dir.join(&out).join("model.safetensors"),
            );
            eprintln!("mpirun -np {np} {file}: largest weight difference {diff:.3e}");
            assert!(diff <= 1e-4, "{file}, np {np}: {diff}");
        }
    }
}

/// The run file's `synchronized = true` on a batch_normalization layer: `mpirun -np 2` and
/// `-np 3` end within the bound of one process (weights and moving statistics); without it,
/// the per-rank statistics end far from it.
#[test]
fn mpirun_with_synchronized_batch_norm_trains_the_weights_of_one_process() {
    if !mpi_available() {
        return;
    }
    let dir = setup("sync-bn");
    let layers = r#"{ type = "dense", name = "hidden", units = 32, activation = "relu", kernel_regularizer = { l2 = 1e-4 } },"#;
    let with_bn = |sync: bool| {
        RUN.replace(
            layers,
            &format!(
                r#"{{ type = "dense", name = "hidden", units = 32 }},
  {{ type = "batch_normalization", name = "bn", momentum = 0.9, synchronized = {sync} }},
  {{ type = "activation", activation = "relu" }},"#
            ),
        )
    };
    assert_ne!(with_bn(true), RUN);
    std::fs::write(dir.join("sync.toml"), with_bn(true)).unwrap();
    std::fs::write(dir.join("local.toml"), with_bn(false)).unwrap();
    let alone = kiln_alone(&["train", "sync.toml", "--quiet", "--out", "alone"], &dir);
    assert!(alone.status.success(), "{}", text(&alone));
    for np in [2, 3] {
        for (file, out) in [("sync.toml", "sync"), ("local.toml", "local")] {
            let out = format!("{out}{np}");
            let o = run_bounded(
                mpirun(np, &["train", file, "--quiet", "--out", &out], &dir),
                "mpirun -np N with batch normalization",
            );
            assert!(o.status.success(), "np {np}: {}", text(&o));
            let diff = max_difference(
                &dir.join("alone/model.safetensors"),
                &dir.join(format!("{out}/model.safetensors")),
            );
            eprintln!("mpirun -np {np} {file}: largest weight difference {diff:.3e}");
            match file {
                "sync.toml" => assert!(diff <= 1e-4, "np {np}: {diff}"),
                _ => assert!(diff > 1e-2, "per-rank statistics, np {np}: only {diff}"),
            }
        }
    }
}

/// Every history.csv value but the epoch times, by column and epoch.
fn history_values(path: &Path) -> Vec<(String, Vec<f64>)> {
    let csv = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = csv.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    header
        .iter()
        .enumerate()
        .filter(|(_, h)| *h != "epoch_time_s")
        .map(|(i, h)| (h.clone(), rows.iter().map(|r| r[i]).collect()))
        .collect()
}

/// A run file's loss weighting (uncertainty, and FAMO with its after-update pass) over the
/// data term and the L2 penalty, with gradient diagnostics on the training and the validation
/// data: `mpirun -np 2` and `-np 3` write the weights and every logged value (term weights,
/// gradient norms and cosines, their validation twins) of one process, within float summation
/// order. Every rank evaluates the whole validation set itself, so its validation gradients
/// are one process's, not summed over the ranks.
#[test]
fn mpirun_with_loss_weighting_and_diagnostics_matches_one_process() {
    if !mpi_available() {
        return;
    }
    let dir = setup("weighting");
    for strategy in ["uncertainty", "famo"] {
        let run = RUN
            .replace(
                "metrics = [\"accuracy\"]",
                &format!(
                    "metrics = [\"accuracy\"]\nloss_weighting = {{ type = \"{strategy}\", added_terms = true }}"
                ),
            )
            .replace(
                "epochs = 6",
                "epochs = 6\ngradient_diagnostics = true\nvalidation_gradient_diagnostics = true",
            );
        assert!(run.contains("loss_weighting") && run.contains("gradient_diagnostics"));
        let file = format!("{strategy}.toml");
        std::fs::write(dir.join(&file), run).unwrap();
        let alone_out = format!("{strategy}-alone");
        let alone = kiln_alone(&["train", &file, "--quiet", "--out", &alone_out], &dir);
        assert!(alone.status.success(), "{}", text(&alone));
        let want = history_values(&dir.join(&alone_out).join("history.csv"));
        for key in [
            "loss_weight/l2",
            "grad_norm/out_loss",
            "grad_cos/out_loss/l2",
            "val_grad_norm/out_loss",
            "val_grad_norm/l2",
            "val_grad_cos/out_loss/l2",
        ] {
            assert!(want.iter().any(|(k, _)| k == key), "{strategy}: no {key}");
        }
        for np in [2, 3] {
            let out = format!("{strategy}-np{np}");
            let o = run_bounded(
                mpirun(np, &["train", &file, "--quiet", "--out", &out], &dir),
                "mpirun -np N with loss weighting",
            );
            assert!(o.status.success(), "np {np}: {}", text(&o));
            let diff = max_difference(
                &dir.join(&alone_out).join("model.safetensors"),
                &dir.join(&out).join("model.safetensors"),
            );
            let got = history_values(&dir.join(&out).join("history.csv"));
            assert_eq!(
                got.iter().map(|c| &c.0).collect::<Vec<_>>(),
                want.iter().map(|c| &c.0).collect::<Vec<_>>()
            );
            let (mut worst, mut worst_val) = (0f64, 0f64);
            for ((key, g), (_, w)) in got.iter().zip(&want) {
                for (g, w) in g.iter().zip(w) {
                    let off = (g - w).abs() / w.abs().max(1.0);
                    assert!(off <= 1e-4, "{strategy}, np {np}: {key} {g} vs {w}");
                    worst = worst.max(off);
                    if key.starts_with("val_grad_") {
                        worst_val = worst_val.max(off);
                    }
                }
            }
            eprintln!(
                "mpirun -np {np} {strategy}: largest weight difference {diff:.3e}, largest \
                 log difference {worst:.3e} (val_grad_*: {worst_val:.3e})"
            );
            assert!(diff <= 1e-4, "{strategy}, np {np}: {diff}");
        }
    }
}

/// The rank of an MPI process of this machine, from the environment Open MPI gave it.
fn rank_of(pid: &str) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("OMPI_COMM_WORLD_RANK="))
        .and_then(|r| r.parse().ok())
}

/// Whether a process still runs (a zombie, waiting for its parent to reap it, does not).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

/// The history as the user reads it, without the timings (the one thing two runs differ in).
fn untimed_csv(path: &Path) -> String {
    let csv = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let time = header.iter().position(|c| *c == "epoch_time_s").unwrap();
    csv.lines()
        .map(|line| {
            let mut cells: Vec<&str> = line.split(',').collect();
            cells.remove(time);
            cells.join(",")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A checkpoint's tensor bytes and its metadata with every `epoch_time_s` of its history
/// left out.
fn checkpoint_untimed(path: &Path) -> (Vec<u8>, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let record = header["__metadata__"]["kiln.checkpoint"].as_str().unwrap();
    let mut record: serde_json::Value = serde_json::from_str(record).unwrap();
    for epoch in record["history"].as_array_mut().unwrap() {
        epoch
            .as_array_mut()
            .unwrap()
            .retain(|pair| pair[0] != "epoch_time_s");
    }
    header["__metadata__"]["kiln.checkpoint"] = record;
    (bytes[8 + n..].to_vec(), header)
}

/// `mpirun -np N` on a run file with a dropout layer, uncertainty loss weighting over the data
/// term and the L2 penalty, and gradient diagnostics on the training and the validation data,
/// with rank `victim` killed by SIGKILL once the first checkpoint is written: the job ends on
/// every rank within the bound, mpirun's message names the killed rank and the signal, and
/// `--resume` from the last checkpoint with the same N writes byte for byte the files of a run
/// never stopped (the weights, the plots, and the last checkpoint and the history, with its
/// `loss_weight/*`, `grad_norm/*`, `grad_cos/*` and `val_grad_*` columns, but for their epoch
/// times).
fn kill_and_resume(np: usize, victim: usize) {
    let dir = setup(&format!("killed-{np}-{victim}"));
    // With a dropout layer: the resumed steps draw the unbroken run's masks.
    let hidden = r#"kernel_regularizer = { l2 = 1e-4 } },"#;
    let slow = RUN
        .replace(
            "epochs = 6",
            "epochs = 40\ngradient_diagnostics = true\nvalidation_gradient_diagnostics = true",
        )
        .replace(
            "metrics = [\"accuracy\"]",
            "metrics = [\"accuracy\"]\nloss_weighting = { type = \"uncertainty\", added_terms = true }",
        )
        .replace(
            hidden,
            &format!("{hidden}\n  {{ type = \"dropout\", rate = 0.2 }},"),
        );
    assert!(slow.contains("dropout") && slow.contains("uncertainty"));
    std::fs::write(dir.join("run.toml"), &slow).unwrap();
    let full = run_bounded(
        mpirun(np, &["train", "run.toml", "--quiet", "--out", "full"], &dir),
        "the unbroken run",
    );
    assert!(full.status.success(), "{}", text(&full));
    let logged = history_values(&dir.join("full/history.csv"));
    for key in [
        "loss_weight/out_loss",
        "loss_weight/l2",
        "grad_norm/out_loss",
        "grad_cos/out_loss/l2",
        "val_grad_norm/l2",
    ] {
        let values = logged.iter().find(|(k, _)| k == key);
        assert!(
            values.is_some_and(|(_, v)| v.len() == 40),
            "np {np}: the history has no {key} for every epoch"
        );
    }
    let mut cmd = mpirun(np, &["train", "run.toml", "--quiet", "--out", "part"], &dir);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let launcher = child.id();
    let last = dir.join("part/checkpoints/last.safetensors");
    let start = Instant::now();
    while !last.exists() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(last.exists(), "no checkpoint appeared");
    // The ranks are mpirun's children; find the victim by the rank Open MPI gave it.
    let children = String::from_utf8(
        Command::new("pgrep")
            .args(["-P", &launcher.to_string()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let pids: Vec<String> = children.split_whitespace().map(String::from).collect();
    let ranked: Vec<(String, usize)> = pids
        .iter()
        .filter_map(|p| rank_of(p).map(|r| (p.clone(), r)))
        .collect();
    assert_eq!(ranked.len(), np, "ranks of mpirun: {pids:?}");
    let (target, _) = ranked.iter().find(|(_, r)| *r == victim).unwrap();
    let killed = Command::new("kill").args(["-9", target]).status().unwrap();
    assert!(killed.success());
    let killed_at = Instant::now();
    let o = wait_bounded(child, Duration::from_secs(60), "the run with a killed rank");
    assert!(!o.status.success());
    let said = text(&o);
    assert!(
        said.contains(&format!("rank {victim}")) && said.contains("signal 9"),
        "np {np}, killed rank {victim}: {said}"
    );
    // Every other rank ended too (no rank left waiting in a collective).
    while ranked.iter().any(|(p, _)| alive(p)) && killed_at.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (p, r) in &ranked {
        assert!(
            !alive(p),
            "np {np}: rank {r} (pid {p}) still runs after rank {victim} died"
        );
    }
    eprintln!(
        "np {np}, rank {victim} killed: the job ended {:.2} s later",
        killed_at.elapsed().as_secs_f64()
    );
    // The run stopped mid-way: its weights are not the unbroken run's yet.
    assert!(
        !dir.join("part/model.safetensors").exists()
            || std::fs::read(dir.join("part/model.safetensors")).unwrap()
                != std::fs::read(dir.join("full/model.safetensors")).unwrap()
    );
    let o = run_bounded(
        mpirun(np, &["train", "--resume", "part", "--quiet"], &dir),
        "the resumed run",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resumed"), "{}", text(&o));
    // The checkpoint: the same tensors, and the same record but for the epoch times.
    let (a, b) = (
        checkpoint_untimed(&dir.join("full/checkpoints/last.safetensors")),
        checkpoint_untimed(&dir.join("part/checkpoints/last.safetensors")),
    );
    assert!(a == b, "np {np}: the resumed run's last checkpoint differs");
    for file in [
        "model.safetensors",
        "loss.svg",
        "metrics.svg",
        "loss.png",
        "metrics.png",
    ] {
        assert!(
            std::fs::read(dir.join("full").join(file)).unwrap()
                == std::fs::read(dir.join("part").join(file)).unwrap(),
            "np {np}: the resumed run's {file} differs from the unbroken run's"
        );
    }
    assert_eq!(
        untimed_csv(&dir.join("full/history.csv")),
        untimed_csv(&dir.join("part/history.csv")),
        "np {np}: the resumed run's history differs"
    );
}

/// A rank killed mid-run ends the run on every rank within seconds, naming the rank; the
/// last checkpoint stays and `--resume` with the same N finishes with the files of a run
/// never stopped: rank 1 of 2, and rank 0 (the one that writes) of 3.
#[test]
fn a_killed_rank_ends_the_run_and_the_checkpoint_resumes() {
    if !mpi_available() {
        return;
    }
    kill_and_resume(2, 1);
    kill_and_resume(3, 0);
}

/// Bad data on one rank (its copy of the file is damaged): that rank names itself and the
/// file, and the run ends on every rank instead of waiting for it.
#[test]
fn bad_data_on_one_rank_ends_the_run_naming_the_rank() {
    if !mpi_available() {
        return;
    }
    let dir = setup("bad-data");
    let mut good = String::from("a,b,label\n");
    for i in 0..60 {
        good.push_str(&format!(
            "{},{},{}\n",
            i as f32 / 60.0,
            (i % 7) as f32,
            i % 2
        ));
    }
    let bad = good.replacen("0.5,2,0", "0.5,oops,0", 1);
    assert_ne!(good, bad);
    std::fs::create_dir_all(dir.join("node0")).unwrap();
    std::fs::create_dir_all(dir.join("node1")).unwrap();
    std::fs::write(dir.join("node0/points.csv"), good).unwrap();
    std::fs::write(dir.join("node1/points.csv"), bad).unwrap();
    let run = r#"
[data]
source = "csv"
path = "points.csv"
label_columns = ["label"]
[model]
layers = [{ type = "dense", units = 1 }]
[compile]
optimizer = { type = "sgd", learning_rate = 0.1 }
loss = { type = "binary_crossentropy", from_logits = true }
[fit]
epochs = 2
batch_size = 20
"#;
    for node in ["node0", "node1"] {
        std::fs::write(dir.join(node).join("run.toml"), run).unwrap();
    }
    // Two "nodes": each rank reads the run file and data of its own folder (MPMD).
    let mut c = Command::new("mpirun");
    let bin = env!("CARGO_BIN_EXE_kiln");
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    for node in ["node0", "node1"] {
        if node == "node1" {
            c.arg(":");
        }
        c.args([
            "-np",
            "1",
            "--oversubscribe",
            "-x",
            "RAYON_NUM_THREADS=1",
            "--wdir",
        ])
        .arg(dir.join(node))
        .args([bin, "train", "run.toml", "--quiet", "--out", out]);
    }
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let start = Instant::now();
    let o = run_bounded(c, "the run with bad data on rank 1");
    assert!(!o.status.success());
    assert!(start.elapsed() < Duration::from_secs(60));
    let said = text(&o);
    assert!(
        said.contains("rank 1 of 2 failed") && said.contains("points.csv"),
        "{said}"
    );
}
