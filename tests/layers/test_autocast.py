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


# --------------------------------------------------------------------------- PyTorch's LSTM kernel
# Under CPU autocast, torch's LSTM goes to oneDNN with bf16 activations and fp32 weights, which
# oneDNN builds only on CPUs with native bf16 instructions. The layer asks once, up front, and runs
# the kernel in fp32 where the answer is no. Both answers are exercised on every CPU: the real one,
# and the other one forced.


def _torch_lstm_runs_under_bf16_autocast() -> bool:
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.randn(1, 2, 3))
    except RuntimeError:
        return False
    return True


def test_capability_check_matches_what_the_kernel_does():
    from rnnkit.ops.torch_rnn import runs_under_autocast

    assert runs_under_autocast("lstm", "cpu", torch.bfloat16) == _torch_lstm_runs_under_bf16_autocast()
    for kind in ("gru", "rnn_tanh"):  # these run in one dtype under autocast, on any CPU
        assert runs_under_autocast(kind, "cpu", torch.bfloat16)
    assert runs_under_autocast("lstm", "cpu", torch.float32)


@pytest.mark.parametrize("supported", [True, False], ids=["kernel-supports-bf16", "kernel-lacks-bf16"])
@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_lstm_torch_kernel_under_bf16_autocast(monkeypatch, supported, kernel):
    """Where oneDNN has bf16 kernels, torch's kernel runs under autocast; where it has none, it runs in
    fp32 with autocast off and one warning, and trains close to the fp32 run instead of crashing."""
    from rnnkit.layers.lstm import LSTM
    from rnnkit.ops import torch_rnn

    if supported and not torch_rnn.runs_under_autocast("lstm", "cpu", torch.bfloat16):
        pytest.skip("this CPU's oneDNN has no bf16 LSTM kernel (the other case covers it)")
    if not supported:
        monkeypatch.setattr(torch_rnn, "runs_under_autocast", lambda kind, device, dtype: dtype == torch.float32)
    torch.manual_seed(0)
    layer = LSTM(d_model=D, hidden_size=6, kernel=kernel)
    assert layer.fused_kernel(torch.device("cpu")) == "torch"
    x = torch.randn(2, 9, D)
    reference, _ = layer(x, lengths=torch.tensor([9, 5]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if supported:
            y, _ = layer(x, lengths=torch.tensor([9, 5]))
        else:
            with pytest.warns(RuntimeWarning, match="cannot run under torch.bfloat16 autocast"):
                y, _ = layer(x, lengths=torch.tensor([9, 5]))
        assert layer._autocast_safe(x, "fused") is supported
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    if not supported:
        assert y.dtype == torch.float32
        assert torch.allclose(y, reference, atol=1e-6)  # computed in fp32 throughout
    assert _relative_rms(y, reference) < 5e-2
