"""Every registered layer trains under bf16 autocast (``rnnkit train --precision bf16``).

Under ``torch.autocast`` matmuls run in bf16 while parameters stay fp32, so a kernel that assumes one
dtype throughout (hand-written autograd, compiled loops) must cope with mixed inputs. The check: the
forward and backward of every layer, in its ``auto`` mode, run, stay finite, and stay near fp32.
"""

from __future__ import annotations

import pytest
import torch

from tests.layers import harness

D = 5  # odd, as in the contract suite (the test configs are sized for it)
LAYERS = harness.registry_cases(D)


def _relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach()
    return float((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-12))


@pytest.mark.parametrize("layer", harness.pytest_params(LAYERS, None))
def test_bf16_autocast_forward_and_backward(layer: harness.LayerCase) -> None:
    torch.manual_seed(0)
    module = layer.make(D, torch.float32)
    x = torch.randn(2, 9, D)
    lengths = torch.tensor([9, 5])
    reference, _ = module(x, lengths=lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = module(x, lengths=lengths)
        y_next, _ = module(x, state=state)  # the state autocast handed back is accepted as it is
    (y.float().sum() + y_next.float().sum()).backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(y_next.float()).all()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    # bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%); 9 steps of rounding stay well inside 5%.
    assert _relative_rms(y, reference) < 5e-2
