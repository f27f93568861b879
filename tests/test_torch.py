"""PyTorch as a second oracle, when it is installed (pip install torch==2.13.0)."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

import bncy
from conftest import make

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 6, 6), (2, 3, 4, 5, 6)])
def test_forward_backward_and_running_stats_match_torch_autograd(shape, rng):
    C = shape[1]
    x = make(shape, np.float64, rng, scale=2.0, offset=0.5)
    w = make(shape, np.float64, rng)
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    rm, rv = np.zeros(C), np.ones(C)
    trm, trv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    tx = torch.tensor(x, requires_grad=True)
    tg = torch.tensor(g, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    for _ in range(3):  # repeated steps: the running statistics accumulate
        y, m, s = bncy.forward(x, g, b, running_mean=rm, running_var=rv, momentum=0.1)
        ty = F.batch_norm(tx, trm, trv, tg, tb, training=True, momentum=0.1, eps=1e-5)
    assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert_allclose(rm, trm.numpy(), rtol=1e-12, atol=1e-14)
    assert_allclose(rv, trv.numpy(), rtol=1e-12)
    (ty * torch.tensor(w)).sum().backward()
    dx, dg, db = bncy.backward(w, x, m, s, g)
    assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
    assert_allclose(dg, tg.grad.numpy(), rtol=1e-9, atol=1e-11)
    assert_allclose(db, tb.grad.numpy(), rtol=1e-9, atol=1e-11)
    yi = bncy.inference(x, rm, rv, g, b)
    tyi = F.batch_norm(torch.tensor(x), trm, trv, tg.detach(), tb.detach(), training=False)
    assert_allclose(yi, tyi.numpy(), rtol=1e-10, atol=1e-12)


def test_channels_last_matches_torch_channels_last(rng):
    nhwc = make((4, 5, 6, 8), np.float32, rng, scale=3.0)
    tx = torch.from_numpy(nhwc).permute(0, 3, 1, 2)     # channels_last NCHW tensor
    assert tx.is_contiguous(memory_format=torch.channels_last)
    ty = F.batch_norm(tx.double(), None, None, training=True)
    y, _, _ = bncy.forward(nhwc, axis=-1)
    assert_allclose(y.transpose(0, 3, 1, 2), ty.numpy(), rtol=2e-6, atol=2e-6)
