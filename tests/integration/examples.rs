//! Each example runs, and its numbers are checked.

#[path = "../../examples/custom_closure_loss.rs"]
mod custom_closure_loss;
#[path = "../../examples/custom_training_step.rs"]
mod custom_training_step;
#[path = "../../examples/focal_loss.rs"]
mod focal_loss;
#[path = "../../examples/intermediate_add_loss.rs"]
mod intermediate_add_loss;
#[path = "../../examples/l2_add_loss.rs"]
mod l2_add_loss;
#[path = "../../examples/multi_output.rs"]
mod multi_output;

fn rel_close(a: f64, b: f64, rtol: f64) -> bool {
    (a - b).abs() <= rtol * b.abs().max(1e-12)
}

#[test]
fn custom_closure_loss_learns_the_coefficients() {
    let s = custom_closure_loss::run(false).unwrap();
    assert!(
        s.last_loss < s.first_loss / 10.0,
        "{} -> {}",
        s.first_loss,
        s.last_loss
    );
    assert!(
        (s.learned_weights[0] - 2.0).abs() < 0.2,
        "{:?}",
        s.learned_weights
    );
    assert!(
        (s.learned_weights[1] + 3.0).abs() < 0.2,
        "{:?}",
        s.learned_weights
    );
}

#[test]
fn focal_loss_classifies_held_out_digits() {
    let s = focal_loss::run(false).unwrap();
    assert!(s.test_accuracy >= 0.94, "accuracy {}", s.test_accuracy);
}

#[test]
fn l2_via_add_loss_is_reported_exactly() {
    let s = l2_add_loss::run(false).unwrap();
    let l2 = s.logs.get("l2").unwrap();
    assert!(
        rel_close(l2, s.factor * s.kernels_sum_of_squares, 1e-5),
        "{l2} vs {}",
        s.factor * s.kernels_sum_of_squares
    );
    assert!(s.logs.get("sparse_categorical_accuracy").unwrap() >= 0.93);
}

#[test]
fn multi_output_total_is_the_weighted_sum_plus_added_terms() {
    let s = multi_output::run(false).unwrap();
    let t = &s.test;
    let expected = t.get("digit_loss").unwrap()
        + s.parity_weight * t.get("parity_loss").unwrap()
        + t.get("l2").unwrap();
    assert!(
        rel_close(t.get("loss").unwrap(), expected, 1e-5),
        "{} vs {expected}",
        t.get("loss").unwrap()
    );
    assert!(t.get("digit_sparse_categorical_accuracy").unwrap() >= 0.94);
    assert!(t.get("parity_binary_accuracy").unwrap() >= 0.93);
}

#[test]
fn intermediate_add_loss_reads_the_hidden_layer() {
    let s = intermediate_add_loss::run(false).unwrap();
    let sparsity = s.test.get("sparsity").unwrap();
    assert!(
        rel_close(sparsity, s.factor * s.mean_abs_hidden, 1e-5),
        "{sparsity} vs {}",
        s.factor * s.mean_abs_hidden
    );
}

#[test]
fn custom_training_step_is_the_step_fit_takes() {
    let s = custom_training_step::run(false).unwrap();
    // With every factor 1, gradients + apply_gradients is fit's step (float noise only).
    assert!(
        s.max_difference_from_fit < 1e-5,
        "{}",
        s.max_difference_from_fit
    );
    assert!(s.test_accuracy >= 0.9, "accuracy {}", s.test_accuracy);
    assert_eq!(s.max_difference_after_reload, 0.0);
}
