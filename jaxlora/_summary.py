"""`summary`: which layers were adapted and how many parameters train."""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx
from flax.core import meta

from jaxlora import _nnx
from jaxlora._linen import LoraModel
from jaxlora._tree import PyTree, adapter_at, iter_adapters, params_of, split


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One adapted layer: path, kernel/A/B shapes, rank, scale and adapter size."""

    path: str
    kernel_shape: tuple[int, ...]
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    scale: float
    params: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """What `lorafy` did: adapted layers and trainable / total parameter counts.

    Attributes:
      layers: one row per adapter.
      trainable_params: parameters that train (adapters, ``modules_to_save``, biases).
      total_params: all parameters, adapters included.
      not_adapted: ``(name, why)`` of each weight the model contracts or looks up that got
        no adapter: not targeted, an embedding not named, or a use jaxlora cannot follow.
    """

    layers: tuple[LayerSummary, ...]
    trainable_params: int
    total_params: int
    not_adapted: tuple[tuple[str, str], ...] = ()

    @property
    def trainable_fraction(self) -> float:
        """Trainable / total parameters."""
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        header = ("layer", "kernel", "A", "B", "r", "scale", "params")
        rows = [
            (
                l.path,
                str(l.kernel_shape),
                str(l.a_shape),
                str(l.b_shape),
                str(l.rank),
                f"{l.scale:g}",
                f"{l.params:,}",
            )
            for l in self.layers
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]
        ]
        if self.not_adapted:
            lines.append("seen, not adapted:")
            lines += [f"  {name}: {why}" for name, why in self.not_adapted]
        lines.append(
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,}"
            f" || trainable%: {100 * self.trainable_fraction:.4f}"
        )
        return "\n".join(lines)


def _size(tree: PyTree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(meta.unbox(tree)))


def _layer_summary(path, weight, a, b, scale) -> LayerSummary:
    return LayerSummary(
        path=path,
        kernel_shape=tuple(weight.shape),
        a_shape=tuple(a.shape),
        b_shape=tuple(b.shape),
        rank=a.shape[-1],
        scale=scale,
        params=a.size + b.size,
    )


def _nnx_summary(module: nnx.Module) -> Summary:
    layers = tuple(
        _layer_summary(name, weight, adapter.lora_a, adapter.lora_b, adapter.scale)
        for name, weight, adapter in _nnx.adapted_weights(module)
    )
    trainable = nnx.state(module, _nnx.TrainableParam)
    total = _size(nnx.state(module, nnx.Param))
    return Summary(layers, _size(trainable), total, _nnx.not_adapted(module))


def summary(adapted: PyTree | nnx.Module, lora_model: LoraModel | None = None) -> Summary:
    """Per-layer adapter shapes and the trainable / total parameter counts.

    Args:
      adapted: an adapted linen tree (params collection or variables dict) or NNX module.
      lora_model: linen: the `LoraModel` from `lorafy`, to list the weights seen and not
        adapted (NNX modules carry that list themselves).

    Returns:
      A `Summary`; ``print(summary)`` shows a table like PEFT's
      ``print_trainable_parameters``, per layer.
    """
    if isinstance(adapted, nnx.Module):
        return _nnx_summary(adapted)
    inner, _ = params_of(adapted)
    layers = tuple(
        _layer_summary(
            name,
            meta.unbox(layer[weight]),
            meta.unbox(adapter_at(layer, weight).a),
            meta.unbox(adapter_at(layer, weight).b),
            adapter_at(layer, weight).scale,
        )
        for name, _, weight, layer in iter_adapters(inner)
    )
    trainable, _ = split(inner)
    not_adapted = () if lora_model is None else lora_model.not_adapted
    return Summary(layers, _size(trainable), _size(inner), not_adapted)
