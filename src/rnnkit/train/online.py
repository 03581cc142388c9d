"""Online learning of a recurrent layer: gradients carried forward in time, not backpropagated.

Real-time recurrent learning (Williams & Zipser 1989) keeps the sensitivity of the state to the
parameters, ``M_t = ds_t/dtheta`` ``(B, S, P)`` for ``S`` floats of state and ``P`` parameters, and
updates it with every step:

    M_t = J_t M_{t-1} + I_t,    J_t = ds_t/ds_{t-1},    I_t = ds_t/dtheta (immediate, at fixed s_{t-1})
    dl_t/dtheta = dl_t/dtheta (immediate) + dl_t/ds_{t-1} M_{t-1}

so the gradient of a loss at step ``t`` is available at step ``t``, with memory independent of the
sequence length: a model can update its weights at every step (or every ``k``) of an endless stream.
:class:`OnlineGradient` does this for any causal rnnkit layer through its ``step``:

- ``method="rtrl"``: exact. Summed over a window its gradients equal backpropagation through time
  over the same window (the tests hold them to fp64 round-off). ``J_t`` and ``I_t`` come from ``S``
  vector-Jacobian products of one step per sequence, and ``M`` costs ``B S P`` floats. For the
  element-wise recurrences (``mingru``, ``minlstm``, ``lru``, ``rglru``, ``s4d``, ``paragru``) each
  state entry depends on its own past only, ``J_t`` is diagonal (``2 x 2`` blocks for complex modes
  stored as (re, im)), which is what makes exact RTRL practical for them (Zucchet et al. 2023,
  *Online learning of long-range dependencies*); for dense cells (``elman``, ``gru``, ``lstm``) it
  is exact too, and affordable for small ``S``.
- ``method="uoro"``: Unbiased Online Recurrent Optimization (Tallec & Ollivier 2018). ``M_t`` is
  replaced by a rank-one estimate ``s~ theta~^T`` whose expectation is ``M_t``: with random signs
  ``nu``, ``s~ <- rho0 J s~ + rho1 nu`` and ``theta~ <- theta~ / rho0 + (nu^T I_t) / rho1``, the
  ``rho`` balancing the two norms. One Jacobian-vector and one vector-Jacobian product per step,
  ``B (S + P)`` floats: the gradient is unbiased, noisy, and cheap for any cell.

Parameters that do not feed the state (a readout after the recurrence, the ``loss_fn``'s head) get
their immediate gradient from ordinary backpropagation through the step.

Example:
    >>> layer = rnnkit.layers.build("mingru", d_model=4, hidden_size=8)
    >>> head = torch.nn.Linear(8, 1)
    >>> online = OnlineGradient(layer)
    >>> online.reset(batch_size=2)
    >>> for x_t, y_t in zip(x.unbind(1), target.unbind(1)):      # x (2, T, 4), target (2, T, 1)
    ...     online.step(x_t, lambda y: ((head(y) - y_t) ** 2).mean())
    ...     optimizer.step(); optimizer.zero_grad()                # update at every step
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from rnnkit.errors import InputError, check_choice, check_positive_int
from rnnkit.layers import Recurrence, flatten_state

#: Gradient methods of :class:`OnlineGradient`.
ONLINE_METHODS = ("rtrl", "uoro")
#: The element-wise recurrences: their state Jacobian is diagonal (or 2 x 2 blocks for complex modes).
ELEMENTWISE_LAYERS = ("mingru", "minlstm", "lru", "rglru", "s4d", "paragru")


class _Stepper(nn.Module):
    """``layer.step`` on a flat state ``(N, S)``, as a module so ``torch.func.functional_call`` can
    swap its parameters."""

    def __init__(self, layer: Recurrence, template: Any) -> None:
        super().__init__()
        self.layer = layer
        self.shapes = [leaf.shape[1:] for leaf in flatten_state(template)]
        self.template = template

    def unflatten(self, s: torch.Tensor) -> Any:
        leaves, start = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            leaves.append(s[:, start : start + n].reshape(s.shape[0], *shape))
            start += n
        found = iter(leaves)
        return _rebuild(self.template, found)

    def forward(self, x_t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, state = self.layer.step(x_t, self.unflatten(s))
        return y, flatten(state)


def _rebuild(template: Any, leaves) -> Any:
    if isinstance(template, torch.Tensor):
        return next(leaves)
    parts = [_rebuild(part, leaves) for part in template]
    return type(template)(*parts) if hasattr(template, "_fields") else tuple(parts)


def flatten(state: Any) -> torch.Tensor:
    """A state as one ``(B, S)`` tensor: its leaves flattened and side by side."""
    return torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in flatten_state(state)], -1)


class OnlineGradient:
    """Forward-carried gradients of ``layer`` (module docstring): call :meth:`reset`, then
    :meth:`step` once per time step; each step adds that step's loss gradient to ``.grad``.

    Args:
        layer: a causal rnnkit layer (its ``step``); its parameters that require gradients are learnt.
        method: ``"rtrl"`` (exact) or ``"uoro"`` (unbiased rank-one estimate).
        block_size: ``rtrl`` only: the state Jacobian is block-diagonal with blocks of this many
            consecutive entries of the flat state (1 for ``mingru``, ``minlstm``, ``rglru``, ``paragru``; 2 for the
            (re, im) pairs of ``lru`` and ``s4d``), so ``M``'s update costs ``B S K P`` instead of
            ``B S^2 P``; None: dense (any layer). A wrong declaration gives wrong gradients.
        generator: the random source of ``uoro``'s signs (a fixed seed makes it reproducible).
    """

    def __init__(self, layer: Recurrence, method: str = "rtrl", block_size: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        if not isinstance(layer, Recurrence):
            raise InputError(f"layer: expected an rnnkit Recurrence, got {type(layer).__name__}")
        if not layer.causal:
            raise InputError(f"layer: expected a causal layer (online learning steps through time), got {type(layer).__name__}")
        check_choice("method", method, ONLINE_METHODS)
        if block_size is not None:
            check_positive_int("block_size", block_size)
            if layer.state_size % block_size:
                raise InputError(f"block_size: expected a divisor of the state size {layer.state_size}, got {block_size}")
        self.layer, self.method, self.generator, self.block_size = layer, method, generator, block_size
        self.names = [n for n, p in layer.named_parameters() if p.requires_grad]
        self.stepper: _Stepper | None = None
        self.state: torch.Tensor | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        named = dict(self.layer.named_parameters())
        return [named[n] for n in self.names]

    def reset(self, batch_size: int, state: Any = None) -> None:
        """Start ``batch_size`` new sequences from ``state`` (default the layer's initial state),
        with zero sensitivities (the initial state does not depend on the parameters)."""
        check_positive_int("batch_size", batch_size)
        template = self.layer.init_state(batch_size)
        self.stepper = _Stepper(self.layer, template)
        self.state = flatten(template if state is None else state).detach()
        ref = self.state
        P = sum(p.numel() for p in self.params)
        if self.method == "rtrl":
            self.sensitivity = ref.new_zeros(batch_size, ref.shape[1], P)  # (B, S, P)
        else:
            self.s_tilde = ref.new_zeros(batch_size, ref.shape[1])  # (B, S)
            self.theta_tilde = ref.new_zeros(batch_size, P)  # (B, P)

    def step(self, x_t: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: ``y_t`` from ``x_t`` ``(B, D)``, the loss ``loss_fn(y_t)`` (a scalar), and its
        full gradient (through the whole past) added to the parameters' ``.grad`` (and to those of
        any module ``loss_fn`` uses). Returns ``(y_t, loss)``, detached."""
        if self.stepper is None or self.state is None:
            raise InputError("step: expected reset(batch_size) first, got no running sequences")
        if x_t.shape[0] != self.state.shape[0]:
            raise InputError(f"x_t: expected batch size {self.state.shape[0]} (as reset), got {x_t.shape[0]}")
        params = self.params
        s_prev = self.state.detach().requires_grad_()
        y, s_new = self.stepper(x_t, s_prev)
        loss = loss_fn(y)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise InputError(f"loss_fn: expected a scalar tensor, got {type(loss).__name__}")
        loss.backward()  # immediate gradients: the layer's (at fixed s_prev), the head's, and dl/ds_prev
        g_s = torch.zeros_like(s_prev) if s_prev.grad is None else s_prev.grad  # (B, S)
        carried = self._carried(g_s)  # (P,)
        start = 0
        for p in params:
            part = carried[start : start + p.numel()].view_as(p)
            p.grad = part.clone() if p.grad is None else p.grad + part
            start += p.numel()
        self._advance(x_t, s_prev.detach())
        self.state = s_new.detach()
        return y.detach(), loss.detach()

    # ------------------------------------------------------------------ the sensitivities
    def _carried(self, g_s: torch.Tensor) -> torch.Tensor:
        """``sum_b dl/ds_prev[b] M_{t-1}[b]`` ``(P,)``."""
        if self.method == "rtrl":
            return torch.einsum("bs,bsp->p", g_s, self.sensitivity)
        return ((g_s * self.s_tilde).sum(-1, keepdim=True) * self.theta_tilde).sum(0)

    def _per_sample(self) -> Callable:
        """``f(params, s, x) -> s_next`` for one sequence (unbatched ``s`` ``(S,)``, ``x`` ``(D,)``)."""
        stepper = self.stepper

        def f(values, s, x):
            _, s_next = torch.func.functional_call(stepper, values, (x[None], s[None]))
            return s_next[0]

        return f

    def _advance(self, x_t: torch.Tensor, s_prev: torch.Tensor) -> None:
        f = self._per_sample()
        values = {"layer." + n: p.detach() for n, p in zip(self.names, self.params)}
        B = s_prev.shape[0]
        if self.method == "rtrl":
            d_params, d_state = torch.func.vmap(torch.func.jacrev(f, argnums=(0, 1)), in_dims=(None, 0, 0))(
                values, s_prev, x_t)
            S = s_prev.shape[1]
            immediate = torch.cat([d_params["layer." + n].reshape(B, S, -1) for n in self.names], -1)  # (B, S, P)
            K = self.block_size
            if K is None:
                carried = torch.bmm(d_state, self.sensitivity)
            else:  # only the diagonal blocks of J: (B, S/K, K, K) times (B, S/K, K, P)
                blocks = torch.diagonal(d_state.reshape(B, S // K, K, S // K, K), dim1=1, dim2=3).permute(0, 3, 1, 2)
                carried = (blocks @ self.sensitivity.reshape(B, S // K, K, -1)).reshape(B, S, -1)
            self.sensitivity = carried + immediate
            return
        nu = torch.randint(0, 2, s_prev.shape, generator=self.generator, dtype=torch.int64).to(s_prev) * 2 - 1

        def one(s, x, tangent, cotangent):
            _, js = torch.func.jvp(lambda ss: f(values, ss, x), (s,), (tangent,))
            _, pull = torch.func.vjp(lambda v: f(v, s, x), values)
            (grads,) = pull(cotangent)
            return js, torch.cat([grads["layer." + n].reshape(-1) for n in self.names])

        js, nu_i = torch.func.vmap(one)(s_prev, x_t, self.s_tilde, nu)  # (B, S), (B, P)
        eps = torch.finfo(s_prev.dtype).tiny ** 0.5
        rho0 = ((self.theta_tilde.norm(dim=-1) + eps) / (js.norm(dim=-1) + eps)).sqrt()[:, None]
        rho1 = ((nu_i.norm(dim=-1) + eps) / (nu.norm(dim=-1) + eps)).sqrt()[:, None]
        self.s_tilde = rho0 * js + rho1 * nu
        self.theta_tilde = self.theta_tilde / rho0 + nu_i / rho1
