"""HiPPO-LegS and its diagonalisation, shared by the S4 and S5 initialisations.

Gu, Dao, Ermon, Rudra & Re, "HiPPO: Recurrent Memory with Optimal Polynomial Projections", NeurIPS
2020 (LegS, Sec. 3), and Gu, Goel & Re, "Efficiently Modeling Long Sequences with Structured State
Spaces", ICLR 2022 (S4, Sec. 3.1 and Appendix C.1): with ``P_n = sqrt(n + 1/2)``, the LegS matrix is
``A = S - P P^T`` where ``S = -I/2 + (skew-symmetric)`` is normal (Smith et al. 2023 call ``S``
HiPPO-N). ``S = V Lambda V^*`` with ``V`` unitary, so in the eigenbasis ``A = Lambda - (V^* P)(V^* P)^*``,
diagonal plus rank one (DPLR). ``S`` is real, so its eigenvalues come in complex-conjugate pairs;
both layers keep one of each pair (``Im Lambda > 0``) and read the other as the conjugate.
"""

from __future__ import annotations

import torch


def hippo_legs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LegS ``A`` (n, n), ``B`` (n,) and the low-rank factor ``P`` (n,) with ``A + P P^T`` normal,
    in float64: ``A_nk = -sqrt(2n+1) sqrt(2k+1)`` below the diagonal, ``-(n+1)`` on it, 0 above;
    ``B_n = sqrt(2n+1)``; ``P_n = sqrt(n + 1/2)``."""
    q = torch.sqrt(2 * torch.arange(n, dtype=torch.float64) + 1)
    A = -torch.tril(q[:, None] * q[None, :], -1) - torch.diag(torch.arange(1, n + 1, dtype=torch.float64))
    return A, q.clone(), q / 2**0.5


def hippo_normal_modes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenvalues with positive imaginary part of HiPPO-N ``S = A + P P^T`` (n even) and their
    unit eigenvectors: ``Lambda`` (n/2,) and ``V`` (n, n/2), complex128, ``Re Lambda = -1/2``.

    ``S + I/2`` is real skew-symmetric, so ``i (S + I/2)`` is Hermitian: its eigenvectors are
    orthonormal, and an eigenvalue ``w`` of it is ``Lambda = -1/2 - i w`` of ``S``.
    """
    A, _, P = hippo_legs(n)
    skew = A + P[:, None] * P[None, :] + 0.5 * torch.eye(n, dtype=torch.float64)
    w, V = torch.linalg.eigh(1j * skew.to(torch.complex128))  # ascending: the negative w first
    lam = torch.complex(torch.full_like(w[: n // 2], -0.5), -w[: n // 2])
    return lam, V[:, : n // 2]


def s4_dplr_init(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S4's DPLR form of LegS, one mode per conjugate pair: ``Lambda`` (n/2,), ``p = V^* P`` (n/2,)
    and ``b = V^* B`` (n/2,), complex128, such that LegS ``A`` is ``Lambda - p p^*`` on the full
    (conjugate-completed) eigenbasis and ``B`` is ``b`` there."""
    _, B, P = hippo_legs(n)
    lam, V = hippo_normal_modes(n)
    Vh = V.conj().T  # (n/2, n)
    return lam, Vh @ P.to(torch.complex128), Vh @ B.to(torch.complex128)
