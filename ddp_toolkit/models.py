"""Built-in models for the default job and tests: linear, MLP and a small CNN (for 8×8 digits)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ddp_toolkit.data import load_factory

__all__ = ["build_model", "mlp", "small_cnn"]


def mlp(in_features: int, num_classes: int, hidden: list[int], batchnorm: bool = False) -> nn.Module:
    """Linear → ReLU blocks (optionally with BatchNorm) and a linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _Square(nn.Module):
    """Reshape flat features to a 1-channel square image (64 → 1×8×8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = int(math.isqrt(x[0].numel())) if len(x) else int(math.isqrt(x.shape[-1]))
        return x.reshape(len(x), 1, side, side)


def small_cnn(in_features: int, num_classes: int, batchnorm: bool = False) -> nn.Module:
    """Two 3×3 convolutions and a linear head, for square single-channel inputs such as the digits."""
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ValueError(f"model.name=cnn needs square inputs, got {in_features} features")
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        _Square(), nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32 * 4, num_classes),
    )


def build_model(cfg, in_features: int, num_classes: int) -> nn.Module:
    """The model named by a ModelConfig, in its dtype, initialised from the current torch seed."""
    if cfg.name == "mlp":
        model = mlp(in_features, num_classes, cfg.hidden, cfg.batchnorm)
    elif cfg.name == "linear":
        model = mlp(in_features, num_classes, [])
    elif cfg.name == "cnn":
        model = small_cnn(in_features, num_classes, cfg.batchnorm)
    else:
        model = load_factory(cfg.factory, "model.factory")(in_features, num_classes)
    return model.to(getattr(torch, cfg.dtype))
