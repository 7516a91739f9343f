"""Built-in models: linear, MLP and a small CNN (for 8×8 digits), a small byte-level transformer LM; and the
model factories of the example workloads (a tiny Hugging Face GPT-2 from its config, a torchvision ResNet-18 on
upsampled digits; both random init, nothing downloaded).

A `model.factory` is called with a `DataInfo` (features, classes, vocab_size, seq_len, input_shape); a factory
that takes two required positional arguments is called the old way, `(in_features, num_classes)`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ddp_toolkit.data import DataInfo, load_factory

__all__ = ["ByteTransformer", "build_model", "call_factory", "hf_causal_lm", "mlp", "resnet18_digits",
           "small_cnn"]


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


class ByteTransformer(nn.Module):
    """A causal transformer LM on token ids (b, T) → logits (b, T, vocab); pre-norm blocks, learned positions.

    Right padding needs no mask: the causal mask keeps every real position from seeing the padding after it.
    """

    def __init__(self, vocab_size: int, seq_len: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"model.width {width} is not divisible by model.heads {heads}")
        self.embed, self.position = nn.Embedding(vocab_size, width), nn.Embedding(seq_len, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        h = self.embed(ids) + self.position(torch.arange(length, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=h.dtype)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def _need(info: DataInfo, *names: str, model: str) -> None:
    missing = [n for n in names if getattr(info, n) is None]
    if missing:
        raise ValueError(f"{model} needs the data's {' and '.join(missing)} (a data set with an `info` DataInfo, "
                         f"e.g. data.name=text)")


def hf_causal_lm(info: DataInfo) -> nn.Module:
    """A tiny Hugging Face GPT-2 (2 layers, width 64) built from its config, random init, no download; takes dict
    batches (input_ids, attention_mask) and returns an output object with `.logits`."""
    _need(info, "vocab_size", "seq_len", model="hf_causal_lm")
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except Exception as err:  # noqa: BLE001 - a broken install raises more than ImportError
        raise ValueError(f"hf_causal_lm needs transformers: pip install 'ddp_toolkit[hf]' ({err})") from None
    config = GPT2Config(vocab_size=info.vocab_size, n_positions=info.seq_len + 1, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                        tie_word_embeddings=False)  # untied: safetensors checkpoints hold no shared tensors
    return GPT2LMHeadModel(config)


class _DigitsAsImage(nn.Module):
    """Flat square grey images (b, side²) → (b, 3, size, size), bilinear upsampling (ImageNet-shaped models)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.shape[-1])
        image = x.reshape(len(x), 1, side, side)
        if len(x):
            image = F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False)
        else:
            image = image.new_zeros(0, 1, self.size, self.size)
        return image.expand(-1, 3, -1, -1)


def resnet18_digits(info: DataInfo) -> nn.Module:
    """torchvision's ResNet-18 (weights=None: random init) on 8×8 digits upsampled to 32×32, 3 channels."""
    _need(info, "classes", "features", model="resnet18_digits")
    try:
        from torchvision.models import resnet18
    except Exception as err:  # noqa: BLE001 - a torchvision built for another torch fails with RuntimeError
        raise ValueError(f"resnet18_digits needs a torchvision built for this torch {torch.__version__}: install "
                         f"the two together (pip install torch torchvision, or 'ddp_toolkit[vision]') "
                         f"({type(err).__name__}: {err})") from None
    return nn.Sequential(_DigitsAsImage(32), resnet18(weights=None, num_classes=info.classes))


def call_factory(factory: Any, info: DataInfo) -> nn.Module:
    """`factory(info)`; a factory with two required positional parameters gets `(in_features, num_classes)`."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        params = []
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) == 2:
        return factory(info.features, info.classes)
    return factory(info)


def build_model(cfg, info: DataInfo | int, num_classes: int | None = None) -> nn.Module:
    """The model named by a ModelConfig, in its dtype, initialised from the current torch seed.

    `info` says what the data holds; `build_model(cfg, in_features, num_classes)` still works."""
    if not isinstance(info, DataInfo):
        info = DataInfo(features=info, classes=num_classes)
    if cfg.name in ("mlp", "linear", "cnn"):
        _need(info, "features", "classes", model=f"model.name={cfg.name}")
    if cfg.name == "mlp":
        model = mlp(info.features, info.classes, cfg.hidden, cfg.batchnorm)
    elif cfg.name == "linear":
        model = mlp(info.features, info.classes, [])
    elif cfg.name == "cnn":
        model = small_cnn(info.features, info.classes, cfg.batchnorm)
    elif cfg.name == "transformer":
        _need(info, "vocab_size", "seq_len", model="model.name=transformer")
        model = ByteTransformer(info.vocab_size, info.seq_len, cfg.width, cfg.layers, cfg.heads)
    else:
        model = call_factory(load_factory(cfg.factory, "model.factory"), info)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model.factory {cfg.factory} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.to(getattr(torch, cfg.dtype))
