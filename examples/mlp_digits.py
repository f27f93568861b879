"""A small NumPy MLP on scikit-learn's digits, trained with and without bncy.BatchNorm.

    pip install ".[examples]"
    python examples/mlp_digits.py [--epochs 40] [--plot docs/mlp_digits.png]

Two identical networks (64 -> 128 -> 64 -> 10, ReLU, softmax cross-entropy, plain
SGD with the same learning rate and the same initial weights), one with a
BatchNorm fused with its ReLU (``activation="relu"``: one pass forward, the mask
recomputed in the backward) after each hidden linear layer. Prints test accuracy
and writes a PNG of the two training-loss curves. Runs in a few seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bncy


class Linear:
    def __init__(self, n_in, n_out, rng):
        self.w = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        self.b = np.zeros(n_out, np.float32)

    def forward(self, x):
        self.x = x
        return x @ self.w + self.b

    def backward(self, dy):
        self.dw = self.x.T @ dy
        self.db = dy.sum(axis=0)
        return dy @ self.w.T

    def params(self):
        return [(self.w, self.dw), (self.b, self.db)]


class ReLU:
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask

    def params(self):
        return []


class BNReLU:
    """bncy.BatchNorm followed by ReLU, fused, as a layer of this little framework."""

    def __init__(self, n):
        self.bn = bncy.BatchNorm(n, axis=1, dtype=np.float32, activation="relu")

    def forward(self, x):
        return self.bn(x)

    def backward(self, dy):
        return self.bn.backward(dy)

    def params(self):
        return [(self.bn.gamma, self.bn.dgamma), (self.bn.beta, self.bn.dbeta)]

    def train(self, mode):
        self.bn.train(mode)


def make_net(use_bn, seed):
    rng = np.random.default_rng(seed)  # same seed: same initial weights for both nets
    layers = [Linear(64, 128, rng), BNReLU(128) if use_bn else ReLU()]
    layers += [Linear(128, 64, rng), BNReLU(64) if use_bn else ReLU()]
    return layers + [Linear(64, 10, rng)]


def softmax_xent(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(labels)), labels] + 1e-12).mean()
    p[np.arange(len(labels)), labels] -= 1
    return float(loss), p / len(labels)


def run(net, xs, ys, xt, yt, epochs, lr, batch, seed):
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        for layer in net:
            getattr(layer, "train", lambda m: None)(True)
        order = rng.permutation(len(xs))
        total = 0.0
        for i in range(0, len(xs) - batch + 1, batch):
            idx = order[i:i + batch]
            h = xs[idx]
            for layer in net:
                h = layer.forward(h)
            loss, grad = softmax_xent(h, ys[idx])
            total += loss * len(idx)
            for layer in reversed(net):
                grad = layer.backward(grad)
            for layer in net:
                for p, g in layer.params():
                    p -= lr * g
        losses.append(total / (len(xs) // batch * batch))
    for layer in net:
        getattr(layer, "train", lambda m: None)(False)   # eval mode: running statistics
    h = xt
    for layer in net:
        h = layer.forward(h)
    return losses, float((h.argmax(axis=1) == yt).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--plot", default="mlp_digits.png")
    args = ap.parse_args(argv)

    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    xs, ys, xt, yt = x[:n_train], y[:n_train], x[n_train:], y[n_train:]

    results = {}
    for name, use_bn in [("without BatchNorm", False), ("with bncy.BatchNorm", True)]:
        t0 = time.perf_counter()
        losses, acc = run(make_net(use_bn, seed=1), xs, ys, xt, yt, args.epochs, args.lr,
                          args.batch, seed=2)
        results[name] = losses
        print(f"{name:22s} final train loss {losses[-1]:.4f}  test accuracy {acc:.3f}  "
              f"({time.perf_counter() - t0:.1f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in results.items():
        ax.plot(np.arange(1, len(losses) + 1), losses, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"NumPy MLP on digits, SGD lr={args.lr}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print("wrote", args.plot)


if __name__ == "__main__":
    main()
