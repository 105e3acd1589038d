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
