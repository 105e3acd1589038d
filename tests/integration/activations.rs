//! Every activation's value and gradient against Keras 3.15.1 on JAX
//! (`tests/fixtures/keras/make_activation_grads.py`), at the points where piecewise definitions
//! meet (0 for relu, leaky_relu, elu, selu, celu; ±1 for hard_tanh; 0 and 6 for relu6; ±3 for
//! hard_sigmoid and hard_silu) and at random points. A layer meets these ties whenever its
//! pre-activation is exactly zero (a zero input with a zero bias: padding, masked steps), and a
//! different tie rule gives a different training step from Keras'.

use kiln::candle::{Device, Tensor, Var};
use kiln::Activation;
use serde_json::Value;

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn every_activation_has_keras_values_and_gradients_at_its_kinks() {
    let fixture: Value =
        serde_json::from_str(include_str!("../fixtures/keras/activation_grads.json")).unwrap();
    let x = matrix(&fixture["x"]);
    let w = matrix(&fixture["w"]);
    let (rows, cols) = (x.len(), x[0].len());
    let dev = Device::Cpu;
    let to_tensor = |m: &[Vec<f32>]| Tensor::from_vec(m.concat(), (rows, cols), &dev).unwrap();
    let cases = fixture["activations"].as_object().unwrap();
    assert_eq!(cases.len(), 23, "one case per activation kiln has");
    let mut wrong = Vec::new();
    for (name, case) in cases {
        let activation: Activation = name.parse().unwrap();
        let var = Var::from_tensor(&to_tensor(&x)).unwrap();
        let y = activation.apply(var.as_tensor()).unwrap();
        let objective = y.mul(&to_tensor(&w)).unwrap().sum_all().unwrap();
        let grads = objective.backward().unwrap();
        let grad = flat(grads.get(var.as_tensor()).unwrap());
        let want_y = matrix(&case["y"]).concat();
        let want_grad = matrix(&case["grad"]).concat();
        for (what, got, want) in [("value", flat(&y), want_y), ("gradient", grad, want_grad)] {
            for (i, (g, k)) in got.iter().zip(&want).enumerate() {
                if (g - k).abs() > 1e-5 + 1e-5 * k.abs() {
                    wrong.push(format!(
                        "{name} {what} at x = {}: kiln {g}, Keras {k}",
                        x[i / cols][i % cols]
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
