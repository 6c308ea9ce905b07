from __future__ import annotations

import math

import pytest
import torch

from ftkit.recipe.schema import TrainSection
from ftkit.train.optim import build_optimizer, lr_at


def cfg(**kw) -> TrainSection:
    return TrainSection(lr=1e-3, **kw)


def test_warmup_then_cosine_to_floor():
    c = cfg(scheduler="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, c, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4)  # (0+1)/10 of peak
    assert lrs[9] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)  # floor = 0.1 × peak at the last step
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_linear_and_constant():
    lin = cfg(scheduler="linear", warmup_steps=0)
    assert lr_at(0, lin, 11) == pytest.approx(1e-3)
    assert lr_at(5, lin, 11) == pytest.approx(5e-4)
    assert lr_at(10, lin, 11) == pytest.approx(0.0)
    const = cfg(scheduler="constant", warmup_ratio=0.1)
    assert [lr_at(s, const, 100) for s in (0, 9, 50, 99)] == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3])


def test_lr_is_pure_function_of_step():
    c = cfg(scheduler="cosine", warmup_ratio=0.05)
    assert [lr_at(s, c, 200) for s in range(200)] == [lr_at(s, c, 200) for s in range(200)]
    assert all(math.isfinite(lr_at(s, c, 1)) for s in range(1))


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_each_optimizer_steps(name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    before = layer.weight.detach().clone()
    opt = build_optimizer(list(layer.parameters()), cfg(optimizer=name))
    layer(torch.randn(4, 64)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, layer.weight)
    assert torch.isfinite(layer.weight).all()
