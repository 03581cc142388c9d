"""The optimizer and its learning-rate schedule: AdamW with decay on matrices, warmup then cosine."""

from __future__ import annotations

import math

import torch

from rnnkit.train.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters; weight decay on matrices only."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Decay matrices only; embeddings (incl. a tied output matrix) and 1-D params are left alone.
        (decay if param.dim() >= 2 and "embedding" not in name else no_decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
        foreach=True,
    )


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at ``step``: linear warmup, then cosine decay to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """The global gradient norm of ``model``, clipped to ``max_norm`` (0: measured, not clipped)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))


__all__ = ["build_optimizer", "clip_gradients", "lr_at", "set_lr"]
