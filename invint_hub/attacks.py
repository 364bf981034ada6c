"""Adversarial perturbations for the paper's attack visualisation (ECCV Sec. 4.3, Fig. 5).

Images live in the pipeline domain: float in [-1, 1], shape (B, C, S, S), so ``eps`` is on
that scale (the official demo's default is 0.02 for 128 px ResNet inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check(x: torch.Tensor, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not (eps >= 0):  # also refuses NaN
        raise ValueError(f"eps must be >= 0, got {eps}")


def fgsm(backbone: nn.Module, x: torch.Tensor, eps: float, target: torch.Tensor | None = None) -> torch.Tensor:
    """Fast gradient sign method: x_adv = clamp(x + eps * sign(grad_x CE(f(x), target)), -1, 1).

    ``target`` holds the labels the attack moves away from (B,); ``None`` uses the
    classifier's own prediction, as the official demo does. ``backbone`` must return
    logits; it is run in eval mode (restored afterwards) and its parameters get no
    gradients, so concurrent calls on a shared model are safe.
    """
    _check(x, eps)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().float().requires_grad_(True)
            logits = backbone(xg)
            if target is None:
                target = logits.argmax(1)
            target = torch.as_tensor(target, device=logits.device).long().view(-1)
            if target.shape[0] != x.shape[0]:
                raise ValueError(f"{target.shape[0]} targets for {x.shape[0]} images")
            loss = F.cross_entropy(logits, target)
            (grad,) = torch.autograd.grad(loss, xg)
    finally:
        backbone.train(was_training)
    return (x.detach().float() + eps * grad.sign()).clamp(-1, 1).to(x.dtype)


def sign_noise(x: torch.Tensor, eps: float, seed: int | None = 0) -> torch.Tensor:
    """The paper's control: x + eps * (random signs), clamped to [-1, 1]; seeded for reproducibility."""
    _check(x, eps)
    g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    signs = torch.randint(0, 2, x.shape, generator=g).float().mul_(2).sub_(1)
    return (x.detach().float() + eps * signs.to(x.device)).clamp(-1, 1).to(x.dtype)


__all__ = ["fgsm", "sign_noise"]
