//! `Model::summary` against the text real Keras 3.15.1 prints for the same models
//! (`tests/fixtures/keras/summary_connections.json`, written by `make_nested_cases.py`): a layer
//! and a nested model applied several times list every application's inputs in "Connected to"
//! with their node and tensor indices, masks given explicitly included.

use kiln::prelude::*;

/// The rows of a summary table as cells, a cell wrapped over several lines joined again
/// (Keras' table wraps long cells at spaces; kiln's does not wrap), and the count lines below.
fn cells(table: &str) -> (Vec<Vec<String>>, Vec<String>) {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut open = false;
    let mut totals = Vec::new();
    for line in table.lines() {
        if line.starts_with('│') {
            let parts: Vec<String> = line
                .trim_matches('│')
                .split('│')
                .map(|c| c.trim().to_string())
                .collect();
            if open {
                let row = rows.last_mut().unwrap();
                for (cell, more) in row.iter_mut().zip(parts) {
                    if !more.is_empty() {
                        cell.push(' ');
                        cell.push_str(&more);
                    }
                }
            } else {
                rows.push(parts);
                open = true;
            }
        } else {
            open = false;
            if line.contains(" params: ") {
                totals.push(line.trim_end().to_string());
            }
        }
    }
    (rows, totals)
}

fn keras_table(case: &str) -> String {
    let text = std::fs::read_to_string("tests/fixtures/keras/summary_connections.json").unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    cases[case].as_str().unwrap().to_string()
}

fn assert_as_keras(case: &str, model: &Model) {
    let (want, want_totals) = cells(&keras_table(case));
    let ours = model.summary();
    let (got, got_totals) = cells(&ours);
    assert!(
        want.iter().all(|r| r.len() == 4),
        "{case}: Keras' table has 4 columns"
    );
    assert_eq!(got, want, "{case}:\n{ours}");
    assert_eq!(got_totals, want_totals, "{case}");
}

fn encoder_like(name: &str, outputs: &[usize]) -> Model {
    let x = Input::new([4]);
    let ys: Vec<SymbolicTensor> = outputs
        .iter()
        .map(|&n| {
            Dense::new(n)
                .activation(Activation::Relu)
                .apply(&x)
                .unwrap()
        })
        .collect();
    Model::builder(&[x], &ys).name(name).build().unwrap()
}

/// A layer shared by two inputs: one row, `a[0][0], b[0][0]`; the layer after it reads its
/// two applications, `shared[0][0], shared[1][0]`.
#[test]
fn a_shared_layer_lists_every_application() {
    let (a, b) = (Input::named("a", [4]), Input::named("b", [4]));
    let shared = Dense::new(3).with_name("shared").shared();
    let (sa, sb) = (shared.apply(&a).unwrap(), shared.apply(&b).unwrap());
    let joined = Concatenate::new()
        .with_name("join")
        .apply_many(&[&sa, &sb])
        .unwrap();
    let y = Dense::new(1).with_name("score").apply(&joined).unwrap();
    assert_as_keras("shared_layer", &Model::new(&[a, b], &[y]).unwrap());
}

/// A nested model applied twice and a layer applied twice, the second time to its own first
/// output: `encoder[0][0], encoder[1][0], add[0][0], encoder[0][0]`, and the head reads
/// `add[1][0]`. Node indices follow the order the applications were made, as Keras counts
/// them, even when the graph runs them in another order.
#[test]
fn a_nested_model_and_a_layer_applied_twice_list_every_node() {
    let enc = encoder_like("encoder", &[2]);
    let (a, b) = (Input::named("a", [4]), Input::named("b", [4]));
    let ea = enc.apply(&a).unwrap();
    let eb = enc.apply(&b).unwrap();
    let add = Add::new().with_name("add").shared();
    let s = add.apply_many(&[&ea, &eb]).unwrap();
    let t = add.apply_many(&[&s, &ea]).unwrap();
    let y = Dense::new(1).with_name("score").apply(&t).unwrap();
    assert_as_keras("nested_twice", &Model::new(&[a, b], &[y]).unwrap());

    // Made b first: its application is node 0.
    let enc = encoder_like("encoder", &[2]);
    let (a, b) = (Input::named("a", [4]), Input::named("b", [4]));
    let eb = enc.apply(&b).unwrap();
    let ea = enc.apply(&a).unwrap();
    let s = Add::new().apply_many(&[&ea, &eb]).unwrap();
    let model = Model::new(&[a, b], &[s]).unwrap();
    let (rows, _) = cells(&model.summary());
    let row = |name: &str| {
        rows.iter()
            .find(|r| r[0].starts_with(name))
            .unwrap()
            .clone()
    };
    assert_eq!(row("encoder (")[3], "b[0][0], a[0][0]");
    assert_eq!(row("add (")[3], "encoder[1][0], encoder[0][0]");
}

/// A nested model of two outputs: its output shapes as Keras writes a list, and each output
/// its tensor index of the one node: `tower[0][0], tower[0][1]`.
#[test]
fn a_nested_model_of_two_outputs_lists_its_tensor_indices() {
    let x = Input::new([4]);
    let (p, q) = (
        Dense::new(2).apply(&x).unwrap(),
        Dense::new(3).apply(&x).unwrap(),
    );
    let tower = Model::builder(&[&x], &[&p, &q])
        .name("tower")
        .build()
        .unwrap();
    let a = Input::named("a", [4]);
    let outs = tower.apply_many(&[&a]).unwrap();
    let both = Concatenate::new()
        .with_name("join")
        .apply_many(&[&outs[0], &outs[1]])
        .unwrap();
    let y = Dense::new(1).with_name("score").apply(&both).unwrap();
    assert_as_keras("nested_two_outputs", &Model::new(&[a], &[y]).unwrap());
}

/// Masks given explicitly, to a nested model and to a layer, are among the tensors the
/// application reads: `steps[0][0], keep[0][0]` and `reader[0][0], keep[0][0]`.
#[test]
fn explicit_masks_are_listed_among_the_connections() {
    let r = Input::new([6, 3]);
    let h = Lstm::new(2)
        .return_sequences(true)
        .with_name("lstm")
        .apply(&r)
        .unwrap();
    let reader = Model::builder(&[r], &[h]).name("reader").build().unwrap();
    let (steps, keep) = (Input::named("steps", [6, 3]), Input::named("keep", [6]));
    let h = reader.apply_with_mask(&steps, &keep).unwrap();
    let g = Gru::new(2)
        .with_name("gru")
        .apply_with_mask(&h, &keep)
        .unwrap();
    let y = Dense::new(1).with_name("score").apply(&g).unwrap();
    assert_as_keras("masks", &Model::new(&[steps, keep], &[y]).unwrap());
}

/// A chain with a layer applied twice in a row is no longer a chain for Keras: the
/// "Connected to" column appears, `twice[0][0]` for the second application.
#[test]
fn a_layer_applied_twice_in_a_row_is_not_a_chain() {
    let x = Input::new([3]);
    let twice = Dense::new(3).with_name("twice").shared();
    let h = twice.apply(&twice.apply(&x).unwrap()).unwrap();
    let model = Model::new(&[x], &[h]).unwrap();
    let table = model.summary();
    assert!(table.contains("Connected to"), "{table}");
    let (rows, _) = cells(&table);
    assert_eq!(rows[1][3], "input[0][0], twice[0][0]");
    // A plain chain keeps three columns.
    let x = Input::new([3]);
    let h = Dense::new(3)
        .apply(&Dense::new(3).apply(&x).unwrap())
        .unwrap();
    assert!(!Model::new(&[x], &[h])
        .unwrap()
        .summary()
        .contains("Connected to"));
}
