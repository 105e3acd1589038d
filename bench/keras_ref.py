"""Keras 3 (JAX backend, jitted train step) reference for the kiln benchmark workloads. Prints
one JSON line per measurement, as pytorch_ref.py does, with "engine": "keras-jax"."""
import os
os.environ.setdefault("KERAS_BACKEND", "jax")
import argparse, json, resource, time

import jax
import keras
import numpy as np


def data(batch, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 784), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)]
    return x, y


def mlp(width, l2=None):
    reg = keras.regularizers.L2(l2) if l2 else None
    inputs = keras.Input((784,))
    h = keras.layers.Dense(width, activation="relu", kernel_regularizer=reg)(inputs)
    h = keras.layers.Dense(width, activation="relu", kernel_regularizer=reg)(h)
    out = keras.layers.Dense(10, kernel_regularizer=reg)(h)
    return inputs, out


class Fgsm(keras.Model):
    """FGSM adversarial regularization in a custom JAX train step (eps 0.05, multiplier 0.5),
    focal loss plus 0.01 * sum(w^2) over the kernels, as kiln's W2."""

    def set_loss(self, loss_fn):
        self.loss_fn = loss_fn
        self.kernel_index = [i for i, v in enumerate(self.trainable_variables) if v.name == "kernel"]

    def _objective(self, trainable, non_trainable, x, y):
        y_pred, non_trainable = self.stateless_call(trainable, non_trainable, x, training=True)
        l2 = sum(0.01 * jax.numpy.sum(trainable[i] ** 2) for i in self.kernel_index)
        return self.loss_fn(y, y_pred) + l2, non_trainable

    def train_step(self, state, data):
        trainable, non_trainable, opt_vars, metrics_vars = state
        x, y = data
        (loss, nt), (g_params, g_x) = jax.value_and_grad(
            lambda tv, xi: self._objective(tv, non_trainable, xi, y), argnums=(0, 1), has_aux=True)(trainable, x)
        x_adv = jax.lax.stop_gradient(x + 0.05 * jax.numpy.sign(g_x))

        def adversarial(tv):
            y_pred, _ = self.stateless_call(tv, non_trainable, x_adv, training=True)
            return 0.5 * self.loss_fn(y, y_pred)

        adv, g_adv = jax.value_and_grad(adversarial)(trainable)
        grads = jax.tree_util.tree_map(lambda a, b: a + b, g_params, g_adv)
        trainable, opt_vars = self.optimizer.stateless_apply(opt_vars, grads, trainable)
        return {"loss": loss + adv}, (trainable, nt, opt_vars, metrics_vars)


def measure(name, batch, width, mission, steps):
    keras.utils.set_random_seed(0)
    inputs, out = mlp(width)
    if mission:
        model = Fgsm(inputs, out)
        loss = keras.losses.CategoricalFocalCrossentropy(gamma=2.0, from_logits=True)
        model.set_loss(loss)
    else:
        model = keras.Model(inputs, out)
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=True)
    x, y = data(batch)
    xs, ys = np.tile(x, (steps, 1)), np.tile(y, (steps, 1))
    model.fit(xs[: 10 * batch], ys[: 10 * batch], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    start = time.perf_counter()
    h = model.fit(xs, ys, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    secs = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": "keras-jax", "workload": name, "batch": batch, "width": width,
                      "steps_per_s": steps / secs, "peak_rss_mb": rss,
                      "final_loss": float(h.history["loss"][-1])}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    for w in a.workloads.split(","):
        if w in ("W1", "W4"):
            measure(w, 128, 512, False, a.steps)
        elif w == "W2":
            measure(w, 128, 512, True, a.steps)
        elif w == "W3":
            for b in (32, 128, 512):
                for width in (128, 512, 2048):
                    measure(f"W3-b{b}-w{width}", b, width, False, max(10, min(400, a.steps * 128 // b)))


if __name__ == "__main__":
    main()
