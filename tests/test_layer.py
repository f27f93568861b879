"""bncy.BatchNorm: training steps, eval mode, state, errors; torch.nn.BatchNorm when installed."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

import bncy
from bncy import reference
from conftest import make


def test_training_steps_match_the_reference(rng):
    bn = bncy.BatchNorm(4, momentum=0.2, dtype=np.float64)
    bn.gamma[:] = rng.standard_normal(4)
    bn.beta[:] = rng.standard_normal(4)
    rm, rv = np.zeros(4), np.ones(4)
    for step in range(4):
        x = make((16, 4, 3, 3), np.float64, rng, scale=step + 1.0, offset=step)
        y = bn(x)
        yr, m, s = reference.forward(x, bn.gamma, bn.beta, running_mean=rm, running_var=rv,
                                     momentum=0.2)
        assert_allclose(y, yr, rtol=1e-11, atol=1e-12)
        dy = make(x.shape, np.float64, rng)
        dx = bn.backward(dy)
        dxr, dgr, dbr = reference.backward(dy, x, m, s, bn.gamma)
        assert_allclose(dx, dxr, rtol=1e-10, atol=1e-12)
        assert_allclose(bn.dgamma, dgr, rtol=1e-10, atol=1e-12)
        assert_allclose(bn.dbeta, dbr, rtol=1e-10, atol=1e-12)
    assert_allclose(bn.running_mean, rm, rtol=1e-12)
    assert_allclose(bn.running_var, rv, rtol=1e-12)
    assert bn.num_batches_tracked == 4


def test_eval_mode_uses_running_statistics_and_updates_nothing(rng):
    bn = bncy.BatchNorm(3, axis=-1, dtype=np.float64)
    bn(make((20, 3), np.float64, rng, scale=2.0, offset=1.0))
    state = bn.state_dict()
    x = make((5, 3), np.float64, rng)
    y = bn.eval()(x)
    assert not bn.training
    assert_allclose(y, reference.inference(x, bn.running_mean, bn.running_var, bn.gamma,
                                           bn.beta, axis=-1), rtol=1e-12)
    for k, v in state.items():
        assert np.array_equal(v, bn.state_dict()[k])


def test_eval_mode_backward_is_the_affine_map_gradient(rng):
    """Finite differences of the eval-mode transform."""
    bn = bncy.BatchNorm(2, dtype=np.float64, eps=1e-3)
    bn.gamma[:] = [1.5, -0.5]
    bn.beta[:] = [0.1, 0.2]
    bn(make((10, 2), np.float64, rng))
    bn.eval()
    x = make((4, 2), np.float64, rng)
    w = make((4, 2), np.float64, rng)
    bn(x)
    dx = bn.backward(w)

    def loss(x_, g_=bn.gamma, b_=bn.beta):
        return float(np.sum(w * reference.inference(x_, bn.running_mean, bn.running_var, g_,
                                                    b_, eps=1e-3)))

    h = 1e-6
    num = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        num[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
    numg = np.array([(loss(x, bn.gamma + h * np.eye(2)[c]) - loss(x, bn.gamma - h * np.eye(2)[c]))
                     / (2 * h) for c in range(2)])
    assert_allclose(bn.dgamma, numg, rtol=1e-6, atol=1e-8)
    assert_allclose(bn.dbeta, w.sum(axis=0), rtol=1e-12)


def test_state_dict_round_trip_and_repr():
    a = bncy.BatchNorm(3, momentum=0.3)
    a(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32))
    b = bncy.BatchNorm(3, momentum=0.3)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert np.array_equal(v, b.state_dict()[k])
    assert "BatchNorm(3" in repr(b) and "momentum=0.3" in repr(b)
    assert bncy.BatchNorm(2, affine=False).gamma is None


def test_errors():
    bn = bncy.BatchNorm(3)
    with pytest.raises(RuntimeError, match="forward"):
        bn.backward(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        bn(np.ones((4, 5), np.float32))
    bn(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="dy"):
        bn.backward(np.ones((5, 3), np.float32))
    before = bn.state_dict()
    with pytest.raises(ValueError):
        bn.load_state_dict({**before, "running_var": np.ones(4)})
    with pytest.raises(ValueError, match="lacks"):
        bn.load_state_dict({"gamma": np.ones(3)})
    for k, v in before.items():
        assert np.array_equal(v, bn.state_dict()[k])
    with pytest.raises(ValueError):
        bncy.BatchNorm(0)
    with pytest.raises(TypeError):
        bncy.BatchNorm(3, dtype=np.int32)
    with pytest.raises(ValueError):
        bncy.BatchNorm(3, momentum=2.0)


@pytest.mark.parametrize("shape", [(32, 6), (8, 6, 5, 5)])
def test_matches_torch_batchnorm_over_steps(shape, rng):
    torch = pytest.importorskip("torch")
    C = shape[1]
    tbn = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(C).double()
    bn = bncy.BatchNorm(C, dtype=np.float64)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor(rng.standard_normal(C)))
        tbn.bias.copy_(torch.tensor(rng.standard_normal(C)))
    bn.gamma[:] = tbn.weight.detach().numpy()
    bn.beta[:] = tbn.bias.detach().numpy()
    for step in range(5):
        x = make(shape, np.float64, rng, scale=1 + step, offset=-step)
        tx = torch.tensor(x, requires_grad=True)
        ty = tbn(tx)
        y = bn(x)
        assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
        w = make(shape, np.float64, rng)
        tbn.zero_grad()
        (ty * torch.tensor(w)).sum().backward()
        assert_allclose(bn.backward(w), tx.grad.numpy(), rtol=1e-9, atol=1e-11)
        assert_allclose(bn.dgamma, tbn.weight.grad.numpy(), rtol=1e-9, atol=1e-11)
    assert_allclose(bn.running_mean, tbn.running_mean.numpy(), rtol=1e-12, atol=1e-14)
    assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-12)
    assert bn.num_batches_tracked == int(tbn.num_batches_tracked)
    tbn.eval()
    bn.eval()
    x = make(shape, np.float64, rng)
    assert_allclose(bn(x), tbn(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12)
