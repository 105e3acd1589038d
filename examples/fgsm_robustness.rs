//! Adversarial regularization with FGSM as an added loss: two identical digit classifiers, one
//! trained plainly and one with `add_loss_term("adversarial", Adversarial::fgsm(…))`, both attacked
//! with FGSM at test time.
//!
//! Run with `cargo run --release --example fgsm_robustness`.

use kiln::prelude::*;

pub struct Summary {
    pub plain_clean: f64,
    pub plain_attacked: f64,
    pub robust_clean: f64,
    pub robust_attacked: f64,
    pub attack_epsilon: f64,
}

fn classifier() -> kiln::Result<Model> {
    let x = Input::new([64]);
    let h = Dense::new(64).activation(Activation::Relu).apply(&x)?;
    let y = Dense::new(10).with_name("digit").apply(&h)?;
    Model::builder(&[x], &[y]).seed(11).build()
}

pub fn run(verbose: bool) -> kiln::Result<Summary> {
    let (train, test) = kiln::data::digits(&Device::Cpu)?.shuffled_split(0.25, 11)?;
    let attack_epsilon = 0.1;
    let attack = Adversarial::fgsm(attack_epsilon).clip(0.0, 1.0);
    let compile = || {
        Compile::new(Adam::new(3e-3))
            .loss(SparseCategoricalCrossentropy::new().from_logits(true))
            .metric(Accuracy::sparse().with_name("accuracy"))
    };
    let fit = Fit::new()
        .epochs(30)
        .batch_size(32)
        .seed(11)
        .verbose(verbose);

    let mut plain = classifier()?;
    plain.compile(compile())?;
    plain.fit(&train, fit.clone())?;

    let mut robust = classifier()?;
    robust.add_loss_term(
        "adversarial",
        Adversarial::fgsm(attack_epsilon)
            .multiplier(0.5)
            .clip(0.0, 1.0),
    )?;
    robust.compile(compile())?;
    robust.fit(&train, fit)?;

    let accuracy = |m: &Model, attacked: bool| -> kiln::Result<f64> {
        let logs = if attacked {
            m.evaluate_under_attack(&test, 512, &attack)?
        } else {
            m.evaluate(&test, 512)?
        };
        Ok(logs.get("accuracy").unwrap_or(f64::NAN))
    };
    Ok(Summary {
        plain_clean: accuracy(&plain, false)?,
        plain_attacked: accuracy(&plain, true)?,
        robust_clean: accuracy(&robust, false)?,
        robust_attacked: accuracy(&robust, true)?,
        attack_epsilon,
    })
}

#[allow(dead_code)]
fn main() -> kiln::Result<()> {
    let s = run(false)?;
    println!(
        "held-out accuracy, clean / under FGSM (eps {}):",
        s.attack_epsilon
    );
    println!(
        "  trained plainly:         {:.4} / {:.4}",
        s.plain_clean, s.plain_attacked
    );
    println!(
        "  trained with FGSM term:  {:.4} / {:.4}",
        s.robust_clean, s.robust_attacked
    );
    Ok(())
}
