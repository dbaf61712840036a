"""A tiny convolutional net in torch, Flax linen and Flax NNX, with the same weights.

``conv1`` (3x3, padding 1), ``conv2`` (3x3, stride 2, dilation 2, padding 2), then a
``head`` Linear on the mean over positions: every convolution setting PEFT's Conv LoRA
copies into its A (kernel size, stride, padding, dilation). torch is NCHW with kernels
``(out, in, h, w)``; Flax is NHWC with kernels ``(h, w, in, out)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

CHANNELS, WIDTH, CLASSES, SIZE = 3, 6, 4, 9


class TorchConvNet(torch.nn.Module):
    """``head(mean(relu(conv2(relu(conv1(x))))))``: ``(batch, 3, 9, 9)`` -> ``(batch, 4)``."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(CHANNELS, WIDTH, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=2, dilation=2)
        self.head = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean((2, 3)))


class ConvNet(nn.Module):
    """linen twin of `TorchConvNet` (NHWC input)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(WIDTH, (3, 3), padding=1, name="conv1")(x))
        conv2 = nn.Conv(WIDTH, (3, 3), strides=2, padding=2, kernel_dilation=2, name="conv2")
        return nn.Dense(CLASSES, name="head")(nn.relu(conv2(h)).mean((1, 2)))


class NnxConvNet(nnx.Module):
    """NNX twin of `TorchConvNet` (NHWC input)."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(CHANNELS, WIDTH, (3, 3), padding=1, rngs=rngs)
        self.conv2 = nnx.Conv(
            WIDTH, WIDTH, (3, 3), strides=2, padding=2, kernel_dilation=2, rngs=rngs
        )
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(h.mean((1, 2)))


def linen_params(model: TorchConvNet) -> dict:
    """`ConvNet` params holding a `TorchConvNet`'s weights."""
    params = {}
    for name in ("conv1", "conv2"):
        conv = getattr(model, name)
        params[name] = {
            "kernel": jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(conv.bias.detach().numpy()),
        }
    params["head"] = {
        "kernel": jnp.asarray(model.head.weight.detach().numpy().T),
        "bias": jnp.asarray(model.head.bias.detach().numpy()),
    }
    return params


def nnx_module(model: TorchConvNet) -> NnxConvNet:
    """An `NnxConvNet` holding a `TorchConvNet`'s weights."""
    module = NnxConvNet(nnx.Rngs(0))
    nnx.update(module, nnx.State(jax.tree.map(lambda x: x, linen_params(model))))
    return module


def images(seed: int = 0, batch: int = 2) -> np.ndarray:
    """Deterministic NHWC images ``(batch, 9, 9, 3)``."""
    return np.random.default_rng(seed).standard_normal((batch, SIZE, SIZE, CHANNELS), np.float32)


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """``model`` on NHWC images, as numpy."""
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
