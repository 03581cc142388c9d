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
their immediate gradient from ordinary backpropagation through the step, and carry no sensitivity.
:mod:`rnnkit.train.online_training` trains whole models this way inside the Trainer
(``TrainConfig(online=...)``, ``rnnkit train --online``).

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
    """``layer.step`` on a flat state ``(N, S)``, after ``encoder`` (when given) on the input, as a
    module so ``torch.func.functional_call`` can swap its parameters."""

    def __init__(self, layer: Recurrence, encoder: nn.Module | None) -> None:
        super().__init__()
        self.layer = layer
        self.encoder = encoder
        template = layer.init_state(1, device="meta")
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
        h = x_t if self.encoder is None else self.encoder(x_t)
        y, state = self.layer.step(h, self.unflatten(s))
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
            ``B S^2 P``; None: dense (any layer). A wrong declaration gives wrong gradients, unless
            ``verify_blocks`` catches it.
        generator: the random source of ``uoro``'s signs (a fixed seed makes it reproducible).
        encoder: a module applied to each input before ``layer`` (an embedding or a projection: ``x_t``
            is then whatever it takes, e.g. token ids ``(B,)``); its parameters are learnt through the
            state like the layer's.
        verify_blocks: with ``block_size``, check at the first step that the state Jacobian has no
            entry outside the declared blocks, and raise InputError if it has.

    Only the parameters the next state depends on carry a sensitivity (found at the first step from
    the step's graph); the others (a readout inside ``layer`` after its recurrence, a skip term) get
    their exact gradient from the step's own backward pass, at no cost in ``M``.
    """

    def __init__(self, layer: Recurrence, method: str = "rtrl", block_size: int | None = None,
                 generator: torch.Generator | None = None, encoder: nn.Module | None = None,
                 verify_blocks: bool = False) -> None:
        if not isinstance(layer, Recurrence):
            raise InputError(f"layer: expected an rnnkit Recurrence, got {type(layer).__name__}")
        if not layer.causal:
            raise InputError(f"layer: expected a causal layer (online learning steps through time), got {type(layer).__name__}")
        check_choice("method", method, ONLINE_METHODS)
        if block_size is not None:
            check_positive_int("block_size", block_size)
            if layer.state_size % block_size:
                raise InputError(f"block_size: expected a divisor of the state size {layer.state_size}, got {block_size}")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise InputError(f"encoder: expected a torch.nn.Module or None, got {type(encoder).__name__}")
        self.layer, self.method, self.generator, self.block_size = layer, method, generator, block_size
        self.stepper = _Stepper(layer, encoder)
        self.verify_blocks = verify_blocks and block_size is not None
        self.names: list[str] | None = None  # the state's parameters, found at the first step
        self.state: torch.Tensor | None = None
        self._carry: dict[str, torch.Tensor] = {}  # the sensitivities (zero until the first step)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The parameters the state depends on (every trainable one before the first step)."""
        named = dict(self.stepper.named_parameters())
        if self.names is None:
            return [p for p in named.values() if p.requires_grad]
        return [named[n] for n in self.names]

    def reset(self, batch_size: int, state: Any = None) -> None:
        """Start ``batch_size`` new sequences from ``state`` (default the layer's initial state),
        with zero sensitivities (the initial state does not depend on the parameters)."""
        check_positive_int("batch_size", batch_size)
        template = self.layer.init_state(batch_size)
        self.state = flatten(template if state is None else state).detach()
        self._carry = {}

    def carry(self) -> dict[str, torch.Tensor] | None:
        """What the next step continues from: the flat state ``(B, S)`` and the sensitivities (``rtrl``:
        ``(B, S, P)``; ``uoro``: ``(B, S)`` and ``(B, P)``), detached; None before :meth:`reset`.
        :meth:`load_carry` of it continues the sequences exactly."""
        if self.state is None:
            return None
        return {"state": self.state, **self._carry}

    def load_carry(self, carry: dict[str, torch.Tensor]) -> None:
        """Continue from what :meth:`carry` returned (on this layer, same method; moved to its device)."""
        ref = next(iter(self.layer.parameters()), None)
        expected = {"state"} | ({"sensitivity"} if self.method == "rtrl" else {"s_tilde", "theta_tilde"})
        if not isinstance(carry, dict) or set(carry) not in (expected, {"state"}):
            raise InputError(f"carry: expected the keys {sorted(expected)} (or only 'state' before the first step), "
                             f"got {sorted(carry) if isinstance(carry, dict) else type(carry).__name__}")
        S = self.layer.state_size
        if carry["state"].dim() != 2 or carry["state"].shape[1] != S:
            raise InputError(f"carry: expected a state of shape (B, {S}), got {tuple(carry['state'].shape)}")
        moved = {k: v.detach().to(device=ref.device, dtype=ref.dtype) if ref is not None else v.detach()
                 for k, v in carry.items()}
        self.state = moved.pop("state")
        self._carry = moved

    def step(self, x_t: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor] | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step: ``y_t`` from ``x_t`` ``(B, D)``, the loss ``loss_fn(y_t)`` (a scalar), and its
        full gradient (through the whole past) added to the parameters' ``.grad`` (and to those of
        any module ``loss_fn`` uses). ``loss_fn=None``: a step without a loss, the sensitivities
        only advance. Returns ``(y_t, loss)``, detached (``loss`` None without a ``loss_fn``)."""
        if self.state is None:
            raise InputError("step: expected reset(batch_size) first, got no running sequences")
        if x_t.shape[0] != self.state.shape[0]:
            raise InputError(f"x_t: expected batch size {self.state.shape[0]} (as reset), got {x_t.shape[0]}")
        s_prev = self.state.detach().requires_grad_()
        with torch.set_grad_enabled(loss_fn is not None or self.names is None):  # a graph only when read
            y, s_new = self.stepper(x_t, s_prev)
        if self.names is None:
            self._find_state_parameters(s_new)
        loss = None
        if loss_fn is not None:
            loss = loss_fn(y)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise InputError(f"loss_fn: expected a scalar tensor, got {type(loss).__name__}")
            loss.backward()  # immediate gradients: the layer's (at fixed s_prev), the head's, and dl/ds_prev
            if self._carry and s_prev.grad is not None:
                carried = self._carried(s_prev.grad)  # (P,)
                start = 0
                for p in self.params:
                    part = carried[start : start + p.numel()].view_as(p)
                    p.grad = part.clone() if p.grad is None else p.grad + part
                    start += p.numel()
        with torch.no_grad():  # the transforms inside differentiate regardless; nothing outside needs a graph
            self._advance(x_t, s_prev.detach())
        self.state = s_new.detach()
        return y.detach(), None if loss is None else loss.detach()

    # ------------------------------------------------------------------ the sensitivities
    def _find_state_parameters(self, s_new: torch.Tensor) -> None:
        """Keep the parameters that ``s_new`` depends on (those absent from its graph never feed the state)."""
        named = [(n, p) for n, p in self.stepper.named_parameters() if p.requires_grad]
        if not named:
            self.names = []
            return
        grads = torch.autograd.grad(s_new.sum(), [p for _, p in named], retain_graph=True, allow_unused=True)
        self.names = [n for (n, _), g in zip(named, grads) if g is not None]

    def _carried(self, g_s: torch.Tensor) -> torch.Tensor:
        """``sum_b dl/ds_prev[b] M_{t-1}[b]`` ``(P,)``."""
        if self.method == "rtrl":
            return torch.einsum("bs,bsp->p", g_s, self._carry["sensitivity"])
        return ((g_s * self._carry["s_tilde"]).sum(-1, keepdim=True) * self._carry["theta_tilde"]).sum(0)

    def _per_sample(self) -> Callable:
        """``f(params, s, x) -> s_next`` for one sequence (unbatched ``s`` ``(S,)``, ``x`` ``(D,)``)."""
        stepper = self.stepper

        def f(values, s, x):
            _, s_next = torch.func.functional_call(stepper, values, (x[None], s[None]))
            return s_next[0]

        return f

    def advance(self, x: torch.Tensor) -> None:
        """``C`` steps without a loss, ``x`` ``(B, C, ...)``: the state and the sensitivities advance as
        ``C`` calls of ``step(x[:, t], None)`` would, the weights unchanged in between. ``rtrl``
        computes the ``C`` steps' Jacobians in one batched call (memory ``C`` times one step's), which
        saves the per-step overhead of the transforms."""
        if self.state is None:
            raise InputError("advance: expected reset(batch_size) first, got no running sequences")
        if x.dim() < 2 or x.shape[0] != self.state.shape[0]:
            raise InputError(f"x: expected (B, C, ...) with B = {self.state.shape[0]} (as reset), got {tuple(x.shape)}")
        if self.method != "rtrl" or self.names == []:  # nothing to batch: one step at a time
            for t in range(x.shape[1]):
                self.step(x[:, t], None)
            return
        start = 0
        if self.names is None:  # the first step finds the parameters the state depends on
            self.step(x[:, 0], None)
            start = 1
        if start == x.shape[1]:
            return
        with torch.no_grad():
            states = [self.state]
            for t in range(start, x.shape[1]):
                states.append(self.stepper(x[:, t], states[-1])[1])
            self._rtrl_advance(x[:, start:], torch.stack(states[:-1], 1))
        self.state = states[-1]

    def _rtrl_advance(self, x: torch.Tensor, s_prev: torch.Tensor) -> None:
        """RTRL's ``M_t = J_t M_{t-1} + I_t`` over ``C`` steps: inputs ``x`` ``(B, C, ...)``, the states
        before each step ``s_prev`` ``(B, C, S)``; their Jacobians in one vmapped call."""
        f = self._per_sample()
        names = self.names
        values = {n: p.detach() for n, p in zip(names, self.params)}
        B, C, S = s_prev.shape
        flat_x, flat_s = x.reshape(B * C, *x.shape[2:]), s_prev.reshape(B * C, S)
        d_params, d_state = torch.func.vmap(torch.func.jacrev(f, argnums=(0, 1)), in_dims=(None, 0, 0))(
            values, flat_s, flat_x)
        immediate = torch.cat([d_params[n].reshape(B, C, S, -1) for n in names], -1)  # (B, C, S, P)
        d_state = d_state.reshape(B, C, S, S)
        if self.verify_blocks:
            self._check_blocks(d_state.reshape(B * C, S, S))
        previous = self._carry.get("sensitivity")
        for c in range(C):  # M_c = I_c + J_c M_{c-1}, in place in I
            if previous is not None:
                self._add_jacobian_product(d_state[:, c], previous, immediate[:, c])
            previous = immediate[:, c]
        self._carry = {"sensitivity": previous if C == 1 else previous.clone()}

    def _add_jacobian_product(self, J: torch.Tensor, M: torch.Tensor, out: torch.Tensor) -> None:
        """``out += J M`` for ``J`` ``(B, S, S)`` and ``M``, ``out`` ``(B, S, P)``; with ``block_size``
        only J's diagonal blocks ``(B, S/K, K, K)`` are used, as ``K`` broadcast products."""
        B, S, _ = J.shape
        K = self.block_size
        if K is None:
            out.add_(torch.bmm(J, M))
            return
        blocks = torch.diagonal(J.reshape(B, S // K, K, S // K, K), dim1=1, dim2=3).permute(0, 3, 1, 2)
        rows, target = M.reshape(B, S // K, K, -1), out.view(B, S // K, K, -1)
        for k in range(K):  # target += J[:, :, :, k] * M[:, :, k]
            target.addcmul_(blocks[:, :, :, k, None], rows[:, :, None, k])

    def _advance(self, x_t: torch.Tensor, s_prev: torch.Tensor) -> None:
        if not self.names:  # nothing learnt feeds the state: no sensitivity to carry
            return
        if self.method == "rtrl":
            self._rtrl_advance(x_t[:, None], s_prev[:, None])
            return
        f = self._per_sample()
        names = self.names
        values = {n: p.detach() for n, p in zip(names, self.params)}
        B, S = s_prev.shape
        nu = torch.randint(0, 2, s_prev.shape, generator=self.generator, dtype=torch.int64).to(s_prev) * 2 - 1
        P = sum(p.numel() for p in self.params)
        s_tilde = self._carry.get("s_tilde", s_prev.new_zeros(B, S))
        theta_tilde = self._carry.get("theta_tilde", s_prev.new_zeros(B, P))

        def one(s, x, tangent, cotangent):
            _, js = torch.func.jvp(lambda ss: f(values, ss, x), (s,), (tangent,))
            _, pull = torch.func.vjp(lambda v: f(v, s, x), values)
            (grads,) = pull(cotangent)
            return js, torch.cat([grads[n].reshape(-1) for n in names])

        js, nu_i = torch.func.vmap(one)(s_prev, x_t, s_tilde, nu)  # (B, S), (B, P)
        eps = torch.finfo(s_prev.dtype).tiny ** 0.5
        rho0 = ((theta_tilde.norm(dim=-1) + eps) / (js.norm(dim=-1) + eps)).sqrt()[:, None]
        rho1 = ((nu_i.norm(dim=-1) + eps) / (nu.norm(dim=-1) + eps)).sqrt()[:, None]
        self._carry = {"s_tilde": rho0 * js + rho1 * nu, "theta_tilde": theta_tilde / rho0 + nu_i / rho1}

    def _check_blocks(self, d_state: torch.Tensor) -> None:
        """Raise InputError if the state Jacobian ``(B, S, S)`` has an entry outside the declared blocks."""
        B, S, _ = d_state.shape
        K = self.block_size
        block_of = torch.arange(S, device=d_state.device) // K
        outside = block_of[:, None] != block_of[None, :]  # (S, S)
        if bool((d_state[:, outside] != 0).any()):
            raise InputError(
                f"block_size: expected a state Jacobian with no entry outside its {K} x {K} diagonal blocks, got "
                f"{int((d_state[:, outside] != 0).sum())} nonzero entries outside them (the state mixes across "
                "entries, so exact RTRL needs the dense update: block_size=None)"
            )
        self.verify_blocks = False
