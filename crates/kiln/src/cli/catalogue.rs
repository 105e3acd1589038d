//! `kiln losses`: the built-in losses, their parameters and Keras' defaults.

/// (name, aliases, parameters with defaults)
const LOSSES: &[(&str, &str, &str)] = &[
    ("mean_squared_error", "mse", "reduction = sum_over_batch_size"),
    ("mean_absolute_error", "mae", "reduction"),
    ("mean_absolute_percentage_error", "mape", "reduction"),
    ("mean_squared_logarithmic_error", "msle", "reduction"),
    ("cosine_similarity", "", "axis = -1, reduction"),
    ("huber", "huber_loss", "delta = 1.0, reduction"),
    ("log_cosh", "logcosh", "reduction"),
    ("hinge", "", "reduction"),
    ("squared_hinge", "", "reduction"),
    ("categorical_hinge", "", "reduction"),
    ("kl_divergence", "kld", "reduction"),
    ("poisson", "", "reduction"),
    ("binary_crossentropy", "bce", "from_logits = false, label_smoothing = 0.0, axis = -1, reduction"),
    (
        "binary_focal_crossentropy",
        "",
        "apply_class_balancing = false, alpha = 0.25, gamma = 2.0, from_logits = false, label_smoothing = 0.0, axis = -1, reduction",
    ),
    ("categorical_crossentropy", "cce", "from_logits = false, label_smoothing = 0.0, axis = -1, reduction"),
    (
        "categorical_focal_crossentropy",
        "",
        "alpha = 0.25, gamma = 2.0, from_logits = false, label_smoothing = 0.0, axis = -1, reduction",
    ),
    ("sparse_categorical_crossentropy", "scce", "from_logits = false, ignore_class = none, reduction"),
    ("ctc", "", "reduction (labels packed left, 0 = blank and padding, logits in)"),
    ("dice", "", "axis = none (whole batch), reduction"),
    ("tversky", "", "alpha = 0.5, beta = 0.5, axis = none, reduction"),
    ("circle", "", "gamma = 80.0, margin = 0.4, remove_diagonal = true, reduction"),
    ("categorical_generalized_cross_entropy", "", "q = 0.5, reduction"),
];

pub fn print() {
    println!(
        "{:<40} {:<12} parameters (defaults as in Keras 3)",
        "loss", "alias"
    );
    for (name, alias, params) in LOSSES {
        println!("{name:<40} {alias:<12} {params}");
    }
    println!(
        "\nreduction: sum_over_batch_size (default), sum, mean, mean_with_sample_weight, none"
    );
    println!("In a run file: loss = \"mse\" or loss = {{ type = \"huber\", delta = 0.5 }}");
}
