"""Closed-form continuous-time (CfC) cell, with irregular time steps.

    z = backbone([x_t, h_{t-1}]),  gate = sigma(-(f_a(z) dt_t + f_b(z)))
    h_t = gate * tanh(g(z)) + (1 - gate) * tanh(k(z))

Hasani, Lechner, Amini, Liebenwein, Ray, Tschaikowski, Teschl & Rus, "Closed-form continuous-time
neural networks", Nature Machine Intelligence 4, 992-1003 (2022), eq. 10 (the CfC) and Methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rnnkit.errors import InputError, check_choice, check_positive_int
from rnnkit.layers.base import Recurrence, length_mask
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.padding import freeze_padding

ACTIVATIONS = ("lecun_tanh", "tanh", "silu", "relu", "gelu")


@dataclass
class CfCConfig:
    """CfC options (defaults of the authors' reference implementation)."""

    d_model: int  # D: input width
    hidden_size: int | None = None  # H: state and output width; default D
    backbone_units: int = 128  # width of each backbone layer
    backbone_layers: int = 1  # depth of the backbone shared by the f, g and k heads
    activation: str = "lecun_tanh"  # backbone nonlinearity; lecun_tanh(v) = 1.7159 tanh(2v/3)

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        if self.hidden_size is None:
            self.hidden_size = self.d_model
        check_positive_int("hidden_size", self.hidden_size)
        check_positive_int("backbone_units", self.backbone_units)
        check_positive_int("backbone_layers", self.backbone_layers)
        check_choice("activation", self.activation, ACTIVATIONS)


def _activation(name: str):
    if name == "lecun_tanh":
        return lambda v: 1.7159 * torch.tanh(0.666 * v)
    return {"tanh": torch.tanh, "silu": nn.functional.silu, "relu": torch.relu, "gelu": nn.functional.gelu}[name]


@register(
    "cfc",
    description="CfC (Hasani et al. 2022): closed-form continuous-time cell, optional per-step dt",
    test_configs={"default": {"hidden_size": 4, "backbone_units": 6}, "deep-tanh": {"backbone_units": 4, "backbone_layers": 2, "activation": "tanh"}},
)
class CfC(Recurrence):
    """Closed-form continuous-time cell (Hasani et al. 2022, eq. 10), elapsed time ``dt`` per step.

    .. math::
        z_t = \\mathrm{backbone}([x_t; h_{t-1}]), \\quad
        s_t = \\sigma(-(f_a(z_t)\\, \\Delta t_t + f_b(z_t))), \\quad
        h_t = s_t \\odot \\tanh(g(z_t)) + (1 - s_t) \\odot \\tanh(k(z_t))

    The paper writes the time gate as ``sigma(-f t)``; as in the authors' reference code, ``f t`` is
    affine in the elapsed time, ``f_a t + f_b`` (``f_b = 0`` recovers eq. 10 exactly). ``f_a, f_b,
    g, k`` are linear heads on a shared backbone of ``backbone_layers`` linear layers with
    ``activation``. Initialisation as in the reference code: Xavier-uniform weight matrices, PyTorch's
    default biases.

    Irregular sampling: ``forward(x, ..., dt=dt)`` with ``dt`` ``(B, T)`` the time elapsed before each
    step (default 1 everywhere; values at padding steps are ignored), ``step(x_t, state, dt=dt_t)``
    with ``dt_t`` ``(B,)``.

    CfC is nonlinear in its state, so it has no parallel form: its only mode is ``recurrent``.

    Args:
        d_model: D. hidden_size: H (default D). backbone_units, backbone_layers, activation: the backbone.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, H)``; state ``h`` ``(B, H)``.

    Example:
        >>> cell = CfC(d_model=3, hidden_size=16)
        >>> t = torch.rand(8, 50).cumsum(1)                     # irregular time stamps
        >>> dt = torch.diff(t, dim=1, prepend=torch.zeros(8, 1))
        >>> y, h = cell(torch.randn(8, 50, 3), dt=dt)           # y (8, 50, 16), h (8, 16)
    """

    MODES = ("recurrent",)
    STEP_INPUTS = ("dt",)

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = cfg = make_config(CfCConfig, "cfc", config)
        self.d_input, self.d_output = cfg.d_model, cfg.hidden_size
        widths = [cfg.d_model + cfg.hidden_size] + [cfg.backbone_units] * cfg.backbone_layers
        self.backbone = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.heads = nn.Linear(cfg.backbone_units, 4 * cfg.hidden_size)  # [f_a; f_b; g; k]
        self._act = _activation(cfg.activation)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in list(self.backbone) + [self.heads]:
            nn.init.xavier_uniform_(layer.weight)
            bound = 1 / math.sqrt(layer.in_features)  # torch.nn.Linear's default bias
            nn.init.uniform_(layer.bias, -bound, bound)

    def _init_state(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.config.hidden_size, device=device, dtype=dtype)

    # ----------------------------------------------------------------- the cell
    def _cell(self, x_t: torch.Tensor, h: torch.Tensor, dt: torch.Tensor | None) -> torch.Tensor:
        """One CfC update: x_t (B, D), h (B, H), dt (B,) or None (= 1) -> new h (B, H)."""
        z = torch.cat([x_t, h], -1)  # (B, D + H)
        for layer in self.backbone:
            z = self._act(layer(z))  # (B, units)
        f_a, f_b, g, k = self.heads(z).chunk(4, -1)  # (B, H) each
        ft = f_a + f_b if dt is None else f_a * dt[:, None] + f_b
        gate = torch.sigmoid(-ft)
        return gate * torch.tanh(g) + (1 - gate) * torch.tanh(k)

    def _step(self, x_t, state, dt=None):
        if dt is not None and not bool((torch.isfinite(dt) & (dt > 0)).all()):
            raise InputError("dt: expected positive finite values, got a value <= 0, NaN or Inf")
        h = self._cell(x_t, state, dt)
        return h, h

    def _forward(self, x, state, lengths, mode, dt=None):
        if dt is not None:
            valid = torch.ones_like(dt, dtype=torch.bool) if lengths is None else length_mask(lengths, x.shape[1])
            if not bool((torch.isfinite(dt[valid]) & (dt[valid] > 0)).all()):
                raise InputError("dt: expected positive finite values at valid steps, got a value <= 0, NaN or Inf")
            dt = torch.where(valid, dt, torch.ones((), dtype=dt.dtype, device=dt.device))  # padding: ignored
        h, ys = state, []
        for t, x_t in enumerate(x.unbind(1)):
            new = self._cell(x_t, h, None if dt is None else dt[:, t])
            h = freeze_padding(t, lengths, new, h)
            ys.append(h)
        return torch.stack(ys, 1), h
