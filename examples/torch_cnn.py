"""A small CNN trained with torch's batch norm and with bncy.torch.convert.

    pip install ".[torch]"
    python examples/torch_cnn.py [--steps 60] [--plot torch_cnn.png]

The data are synthetic 16x16 images of three kinds of stripes (horizontal,
vertical, diagonal) under noise, so the example needs nothing but torch. Two
copies of one network (conv-BN-ReLU twice, pooling, a linear layer with a
BatchNorm1d before the classifier) start from the same weights and see the same
batches; one is converted with ``bncy.torch.convert``. The script prints both
loss curves and their largest difference, then trains each again at 1 and 2
threads and says whether the runs are bitwise identical. ``--plot`` writes a PNG
of the curves (needs matplotlib). Takes under a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import bncy.torch as bt


def batches(steps: int, batch: int = 32, seed: int = 0):
    """(images, labels) of stripes: label 0 horizontal, 1 vertical, 2 diagonal."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    out = []
    for _ in range(steps):
        labels = torch.randint(0, 3, (batch,), generator=g)
        phase = torch.rand(batch, 1, 1, generator=g) * 6.28
        coord = torch.stack([i, j, (i + j) / 1.41])[labels]          # (batch, 16, 16)
        images = torch.sin(coord * 1.2 + phase) + 2.5 * torch.randn(batch, 16, 16, generator=g)
        out.append((images.unsqueeze(1), labels))
    return out


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


def train(model: nn.Module, data, lr: float = 0.02) -> list[float]:
    """SGD with momentum over the batches; the loss of each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for images, labels in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def bitwise_same_at_1_and_2_threads(make, data) -> bool:
    """Train copies of make() at 1 and 2 threads: identical losses and weights?"""
    runs = []
    for nt in (1, 2):
        torch.set_num_threads(nt)
        model = make()
        losses = train(model, data)
        runs.append((losses, [t.clone() for t in model.state_dict().values()]))
    (l1, s1), (l2, s2) = runs
    return l1 == l2 and all(torch.equal(a, b) for a, b in zip(s1, s2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--plot", help="write the loss curves to this PNG (matplotlib)")
    args = ap.parse_args(argv)
    data = batches(args.steps)
    ref = network()
    ours = bt.convert(copy.deepcopy(ref))

    # warm up on copies: torch's first steps set up its thread pool and conv kernels
    for model in (ref, ours):
        train(copy.deepcopy(model), data[:3])
    t0 = time.perf_counter()
    torch_losses = train(ref, data)
    t1 = time.perf_counter()
    bncy_losses = train(ours, data)
    t2 = time.perf_counter()
    print("step   torch BN   bncy.torch")
    for s in sorted({0, 1, 2, 5, 10, 20, 40, args.steps - 1} & set(range(args.steps))):
        print(f"{s:4d}   {torch_losses[s]:.6f}   {bncy_losses[s]:.6f}")
    diff = max(abs(a - b) for a, b in zip(torch_losses, bncy_losses))
    print(f"largest loss difference over {args.steps} steps: {diff:.2e} "
          f"(times at {torch.get_num_threads()} threads: torch {t1 - t0:.2f} s, "
          f"bncy.torch {t2 - t1:.2f} s)")

    same = {name: bitwise_same_at_1_and_2_threads(make, data[:10])
            for name, make in [("torch BN", network),
                               ("bncy.torch", lambda: bt.convert(network()))]}
    for name, ok in same.items():
        print(f"{name}: 10 steps at 1 and 2 threads bitwise identical: {ok}")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(torch_losses, label="torch BatchNorm")
        ax.plot(bncy_losses, "--", label="bncy.torch.convert")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return torch_losses, bncy_losses, same


if __name__ == "__main__":
    main()
