"""PyTorch reference for the kiln benchmark workloads (see README.md). Prints one JSON line per
measurement: {"engine": "pytorch", "workload", "batch", "width", "steps_per_s", "peak_rss_mb"}."""
import argparse, json, resource, time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(__import__("os").environ.get("BENCH_THREADS", "2")))


def data(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 784, generator=g)
    y = F.one_hot(torch.randint(0, 10, (batch,), generator=g), 10).float()
    return x, y


def mlp(width):
    return torch.nn.Sequential(
        torch.nn.Linear(784, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, 10))


def focal(logits, y, gamma=2.0, alpha=0.25, eps=1e-7):
    p = torch.softmax(logits, -1).clamp(eps, 1 - eps)
    return (alpha * (1 - p) ** gamma * (-y * torch.log(p))).sum(-1).mean()


def measure(name, batch, width, mission, steps):
    model = mlp(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    x, y = data(batch)
    kernels = [m.weight for m in model if isinstance(m, torch.nn.Linear)]

    def step():
        opt.zero_grad(set_to_none=True)
        if not mission:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        else:
            xv = x.clone().requires_grad_(True)
            clean = focal(model(xv), y) + 0.01 * sum((k * k).sum() for k in kernels)
            params = list(model.parameters())
            grads = torch.autograd.grad(clean, params + [xv])
            x_adv = (x + 0.05 * grads[-1].sign()).detach()
            adv = 0.5 * focal(model(x_adv), y)
            adv.backward()
            for p, g in zip(params, grads[:-1]):
                p.grad = p.grad + g
            loss = clean.detach() + adv.detach()
        opt.step()
        return loss

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    secs = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": "pytorch", "workload": name, "batch": batch, "width": width,
                      "steps_per_s": steps / secs, "peak_rss_mb": rss, "final_loss": float(loss)}), flush=True)


def cnn(batch_norm):
    """C1 / C2 (channels first in torch; same shapes and parameter counts as kiln's)."""
    layers = []
    for cin, cout in ((1, 32), (32, 64)):
        layers.append(torch.nn.Conv2d(cin, cout, 3))
        if batch_norm:
            layers.append(torch.nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01))
        layers += [torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
    layers += [torch.nn.Flatten(), torch.nn.Linear(5 * 5 * 64, 128), torch.nn.ReLU(),
               torch.nn.Linear(128, 10)]
    return torch.nn.Sequential(*layers)


class Rnn(torch.nn.Module):
    """R1 / R2: Embedding(1000, 64) -> LSTM/GRU 128 (last output) -> Dense 2. torch's GRU has two
    bias rows, as Keras' reset_after=True."""

    def __init__(self, gru):
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 64)
        self.rnn = (torch.nn.GRU if gru else torch.nn.LSTM)(64, 128, batch_first=True)
        self.out = torch.nn.Linear(128, 2)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.out(h[:, -1])


def params(model):
    # BatchNorm's running mean and variance count, as in Keras' count_params.
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if "running" in n)


def measure_model(name, model, x, y, steps):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    secs = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": "pytorch", "workload": name, "batch": x.shape[0], "params": params(model),
                      "steps_per_s": steps / secs, "peak_rss_mb": rss, "final_loss": float(loss)}), flush=True)


def measure_predict(name, model, x, repeats):
    model.eval()
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        secs = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": "pytorch", "workload": name, "batch": x.shape[0], "params": params(model),
                      "steps_per_s": repeats * x.shape[0] / secs, "peak_rss_mb": rss}), flush=True)


def images(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = F.one_hot(torch.randint(0, 10, (batch,), generator=g), 10).float()
    return x, y


def tokens(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 1000, (batch, 50), generator=g)
    y = F.one_hot(torch.randint(0, 2, (batch,), generator=g), 2).float()
    return x, y


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
            measure_model(w, Rnn(w == "R2"), *tokens(64), max(3, a.steps // 10))
        elif w == "P1-C1":
            measure_predict(w, cnn(False), images(1024, 2)[0], max(1, a.steps // 10))
        elif w == "P1-W1":
            measure_predict(w, mlp(512), data(1024, 2)[0], a.steps)


if __name__ == "__main__":
    main()
