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


def cnn(batch_norm):
    """C1 / C2: Conv2D 32 3x3 relu -> MaxPool 2 -> Conv2D 64 3x3 relu -> MaxPool 2 -> Dense 128
    relu -> Dense 10, BatchNormalization after each convolution (before relu) in C2."""
    inputs = keras.Input((28, 28, 1))
    h = inputs
    for filters in (32, 64):
        if batch_norm:
            h = keras.layers.Conv2D(filters, 3)(h)
            h = keras.layers.BatchNormalization()(h)
            h = keras.layers.Activation("relu")(h)
        else:
            h = keras.layers.Conv2D(filters, 3, activation="relu")(h)
        h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(128, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def rnn(gru):
    """R1 / R2: Embedding(1000, 64) -> LSTM/GRU 128 (last output; GRU reset_after=True) -> Dense 2."""
    inputs = keras.Input((50,))
    e = keras.layers.Embedding(1000, 64)(inputs)
    h = (keras.layers.GRU if gru else keras.layers.LSTM)(128)(e)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def measure_model(name, model, x, y, steps):
    keras.utils.set_random_seed(0)
    batch = x.shape[0]
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True), jit_compile=True)
    xs, ys = np.tile(x, (steps,) + (1,) * (x.ndim - 1)), np.tile(y, (steps, 1))
    model.fit(xs[: 3 * batch], ys[: 3 * batch], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    start = time.perf_counter()
    h = model.fit(xs, ys, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    secs = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": "keras-jax", "workload": name, "batch": batch, "params": model.count_params(),
                      "steps_per_s": steps / secs, "peak_rss_mb": rss,
                      "final_loss": float(h.history["loss"][-1])}), flush=True)


def measure_predict(name, model, x, repeats):
    model.compile(jit_compile=True)
    model.predict(x, batch_size=x.shape[0], verbose=0)
    start = time.perf_counter()
    for _ in range(repeats):
        model.predict(x, batch_size=x.shape[0], verbose=0)
    secs = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": "keras-jax", "workload": name, "batch": x.shape[0], "params": model.count_params(),
                      "steps_per_s": repeats * x.shape[0] / secs, "peak_rss_mb": rss}), flush=True)


def images(batch, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    return x, np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)]


def tokens(batch, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 1000, (batch, 50)).astype(np.int32)
    return x, np.eye(2, dtype=np.float32)[rng.integers(0, 2, batch)]


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
        elif w in ("C1", "C2"):
            measure_model(w, cnn(w == "C2"), *images(128), max(3, a.steps // 10))
        elif w in ("R1", "R2"):
            measure_model(w, rnn(w == "R2"), *tokens(64), max(3, a.steps // 10))
        elif w == "P1-C1":
            measure_predict(w, cnn(False), images(1024, 2)[0], max(1, a.steps // 10))
        elif w == "P1-W1":
            inputs, out = mlp(512)
            measure_predict(w, keras.Model(inputs, out), data(1024, 2)[0], a.steps)


if __name__ == "__main__":
    main()
