"""The entry points that take linen models (functional) and NNX modules (stateful) alike."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxlora import _linen, _nnx, _tree
from jaxlora._config import LoraConfig


def lorafy(
    model: Any,
    *args: Any,
    key: jax.Array | None = None,
    rngs: nnx.Rngs | None = None,
    rank_axis: str | None = None,
    **kwargs: Any,
) -> Any:
    """Adds LoRA adapters to the targeted layers of a Flax model, without editing its code.

    **linen**: ``lorafy(model, params, config, *inputs, key=key, **apply_kwargs)``.
    The model is traced once, abstractly (``jax.eval_shape``, no FLOPs), on example
    inputs to find every Dense, DenseGeneral, Einsum and Embed layer (inside ``nn.scan``
    and ``nn.remat`` too) and how its kernel is laid out; each targeted layer's params
    gain a `LoraAdapter` under ``"lora"``.

    **NNX**: ``lorafy(module, config, rngs=rngs)`` wraps each targeted Linear,
    LinearGeneral, Einsum and Embed in a `LoraLayer` in place and returns the module.

    A is random, B is zero: the adapted model equals the base model until B trains.

    **Sharding**: adapters follow their kernels. A kernel placed with a `NamedSharding`
    gets A sharded like its input axes and B like its output axes (stacked layer axes
    kept, rank replicated), created in place on the devices; linen ``nn.Partitioned`` /
    ``nn.LogicallyPartitioned`` boxes and NNX ``out_sharding`` metadata get derived
    names, so ``nn.get_partition_spec`` / ``nnx.get_partition_spec`` cover the adapters.
    See `adapter_partition_specs`.

    Args:
      model: a linen ``nn.Module`` or an NNX ``nnx.Module``.
      *args: linen: ``params`` (the ``params`` collection or the whole variables dict),
        ``config``, then the example positional inputs of ``model.apply`` (arrays or
        ``jax.ShapeDtypeStruct``). NNX: ``config``.
      key: linen: PRNG key for A (folded with each layer's path).
      rngs: NNX: ``nnx.Rngs`` (``params`` stream for A, ``dropout`` for LoRA dropout).
      rank_axis: a mesh axis to shard the rank axis of A and B over (default None:
        replicated); skipped in a factor whose other axes already use it. The rank must
        be divisible by its size.
      **kwargs: linen: example keyword arguments of ``model.apply``
        (``deterministic=True``, ``method=...``).

    Returns:
      linen: ``(lora_model, lora_params)``; ``lora_model.apply`` takes the arguments of
      ``model.apply`` and ``lora_params`` has the form of ``params``. NNX: the module.

    Example:
      >>> cfg = jaxlora.LoraConfig(rank=8, alpha=16, targets=["query", "value"])
      >>> lora_model, lora_params = jaxlora.lorafy(model, params, cfg, x, key=key)
      >>> y = lora_model.apply({"params": lora_params}, x)
    """
    if isinstance(model, nnx.Module):
        if rngs is None or len(args) != 1 or not isinstance(args[0], LoraConfig) or kwargs:
            raise TypeError(
                "lorafy(nnx_module, config, rngs=nnx.Rngs(0)): NNX modules take a "
                "LoraConfig and rngs, nothing else."
            )
        return _nnx.lorafy(model, args[0], rngs=rngs, rank_axis=rank_axis)
    if len(args) < 2 or not isinstance(args[1], LoraConfig) or key is None:
        raise TypeError(
            "lorafy(model, params, config, *example_inputs, key=jax.random.key(0)): linen "
            "models take their params, a LoraConfig, example inputs of model.apply and a key."
        )
    params, config, *inputs = args
    return _linen.lorafy(model, params, config, *inputs, key=key, rank_axis=rank_axis, **kwargs)


def merge(adapted: Any) -> Any:
    """Folds every adapter into its kernel, ``W + scale · A ⊗ B``, for zero-overhead inference.

    Pure: the adapted tree or module is left as it was. Accumulates in float32 and keeps
    each kernel's dtype; jit-able on linen trees.

    Args:
      adapted: an adapted linen tree (params collection or variables dict) or NNX module.

    Returns:
      Plain params for the original linen model, or a plain copy of the NNX module.

    Example:
      >>> merged = jaxlora.merge(lora_params)
      >>> model.apply({"params": merged}, x)  # equals lora_model.apply(...)
    """
    if isinstance(adapted, nnx.Module):
        return _nnx.merge(adapted)
    return _tree.merge(adapted)


def unmerge(merged: Any, adapted: Any) -> Any:
    """Undoes `merge`: the adapted tree/module with kernels ``merged - scale · A ⊗ B``.

    Args:
      merged: the output of ``merge(adapted)``.
      adapted: the adapted tree or module whose adapters were merged.

    Returns:
      An adapted tree/module like ``adapted``, with its other weights taken from ``merged``.
    """
    if isinstance(adapted, nnx.Module):
        return _nnx.unmerge(merged, adapted)
    return _tree.unmerge(merged, adapted)
