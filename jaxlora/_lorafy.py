"""The entry points that take linen models (functional) and NNX modules (stateful) alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import _bank, _bank_nnx, _linen, _nnx, _tree
from jaxlora._config import LoraConfig


def lorafy(
    model: Any,
    *args: Any,
    key: jax.Array | None = None,
    rngs: nnx.Rngs | None = None,
    rank_axis: str | None = None,
    name: str | None = None,
    **kwargs: Any,
) -> Any:
    """Adds LoRA adapters to the targeted layers of a Flax model, without editing its code.

    **linen**: ``lorafy(model, params, config, *inputs, key=key, **apply_kwargs)``.
    ``model.apply`` is traced once, abstractly (no FLOPs), on example inputs, and every
    weight it consumes in a contraction (``jnp.einsum``, ``jnp.dot``, ``@``,
    ``lax.dot_general``, ``ragged_dot``, ``conv``) or an embedding lookup is found,
    whichever module holds it — Flax's layers or the model's own ``Einsum`` modules,
    bare params, ``nn.scan``/``nn.remat``/``nn.jit``/``share_scope``/bridged modules —
    with which of its axes meet the input (A's side), stay in the output (B's side) or
    are stacked (scanned layers, experts). Each targeted weight's module params gain a
    `LoraAdapter` (key ``"lora"`` beside a ``kernel``/``embedding``, ``"lora_<name>"``
    beside another weight).

    **NNX**: ``lorafy(module, config, *inputs, rngs=rngs)`` wraps each targeted Linear,
    LinearGeneral, Einsum and Embed in a `LoraLayer`, and, given example inputs of
    ``module.__call__``, each module of the user's holding a targeted weight in a
    `LoraModule`, in place, and returns the module.

    Targets are matched against a layer's path and, for other weights, against both the
    holding module's path (``"q_proj"``) and the weight's own (``"mlp/gating_einsum"``);
    ``"all-linear"`` takes every contracted weight that is not an embedding. A pattern
    that matches nothing, or names a weight whose use jaxlora cannot follow, is an
    error; what was seen and not adapted is listed by `summary`.

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
        ``jax.ShapeDtypeStruct``). NNX: ``config``, then optionally example inputs of
        ``module.__call__``.
      key: linen: PRNG key for A (folded with each layer's path).
      rngs: NNX: ``nnx.Rngs`` (``params`` stream for A, ``dropout`` for LoRA dropout).
      name: add the adapter under this name to a bank of adapters on one base. linen:
        ``params`` is an `AdapterBank`, or base params to start one; returns
        ``(BankModel, bank)``. NNX: ``model`` is a `LoraBank`, or the base module to wrap
        in one; returns the bank.
      rank_axis: a mesh axis to shard the rank axis of A and B over (default None:
        replicated); skipped in a factor whose other axes already use it. The rank must
        be divisible by its size.
      **kwargs: example keyword arguments of ``model.apply`` (linen:
        ``deterministic=True``, ``method=...``) or of ``module.__call__`` (NNX).

    Returns:
      linen: ``(lora_model, lora_params)``; ``lora_model.apply`` takes the arguments of
      ``model.apply`` and ``lora_params`` has the form of ``params``. NNX: the module.

    Example:
      >>> cfg = jaxlora.LoraConfig(rank=8, alpha=16, targets=["query", "value"])
      >>> lora_model, lora_params = jaxlora.lorafy(model, params, cfg, x, key=key)
      >>> y = lora_model.apply({"params": lora_params}, x)
    """
    if isinstance(model, nnx.Module):
        if rngs is None or not args or not isinstance(args[0], LoraConfig) or key is not None:
            raise TypeError(
                "lorafy(nnx_module, config, *example_inputs, rngs=nnx.Rngs(0)): NNX modules "
                "take a LoraConfig, rngs and (to adapt weights outside Flax's layers) example "
                "inputs of their __call__."
            )
        config, *inputs = args
        if name is not None or isinstance(model, _bank_nnx.LoraBank):
            if name is None:
                raise TypeError("lorafy on a LoraBank needs name= for the new adapter.")
            bank = model if isinstance(model, _bank_nnx.LoraBank) else _bank_nnx.LoraBank(model)
            bank.add(name, config, *inputs, rngs=rngs, rank_axis=rank_axis, **kwargs)
            return bank
        return _nnx.lorafy(model, config, *inputs, rngs=rngs, rank_axis=rank_axis, **kwargs)
    if len(args) < 2 or not isinstance(args[1], LoraConfig) or key is None:
        raise TypeError(
            "lorafy(model, params, config, *example_inputs, key=jax.random.key(0)): linen "
            "models take their params, a LoraConfig, example inputs of model.apply and a key."
        )
    params, config, *inputs = args
    if name is not None or isinstance(_bank.bank_of(params)[0], _bank.AdapterBank):
        if name is None:
            raise TypeError("lorafy on an AdapterBank needs name= for the new adapter.")
        return _bank.lorafy(
            model, params, config, *inputs, key=key, name=name, rank_axis=rank_axis, **kwargs
        )
    return _linen.lorafy(model, params, config, *inputs, key=key, rank_axis=rank_axis, **kwargs)


def merge(
    adapted: Any, dtype: Any = jnp.bfloat16, *, adapters: str | Sequence[str] | None = None
) -> Any:
    """Folds every adapter into its kernel, ``W + scale · A ⊗ B``, for zero-overhead inference.

    Pure: the adapted tree or module is left as it was. Accumulates in float32 and keeps
    each kernel's dtype; jit-able on linen trees. A base stored quantized
    (``LoraConfig(quantize=...)``) comes out dense in ``dtype``: each weight is
    ``dequantize(W) + scale · A ⊗ B`` in float32, rounded once to ``dtype`` (relative
    error at most 2⁻⁹ in bfloat16, none in float32, against the adapted model's weights).

    Args:
      adapted: an adapted linen tree (params collection or variables dict) or NNX module,
        or an `AdapterBank`.
      dtype: the dtype of weights stored quantized once merged (bfloat16 by default;
        float32 reproduces the adapted model's weights exactly).
      adapters: for a bank, the name(s) of the adapters to fold (their ΔW add up).

    Returns:
      Plain params for the original linen model, or a plain copy of the NNX module.

    Example:
      >>> merged = jaxlora.merge(lora_params)
      >>> model.apply({"params": merged}, x)  # equals lora_model.apply(...)
    """
    if isinstance(adapted, nnx.Module):
        return _nnx.merge(adapted, dtype)
    if isinstance(adapted, _bank.AdapterBank):
        if adapters is None:
            raise TypeError(f"merge(bank, adapters=...): name the adapters, among {adapted.names}.")
        return _bank.merge(adapted, adapters, dtype)
    return _tree.merge(adapted, dtype)


def unmerge(merged: Any, adapted: Any) -> Any:
    """Undoes `merge`: the adapted tree/module with kernels ``merged - scale · A ⊗ B``.

    Args:
      merged: the output of ``merge(adapted)``.
      adapted: the adapted tree or module whose adapters were merged.

    Returns:
      An adapted tree/module like ``adapted``, with its other weights taken from ``merged``.

    Raises:
      ValueError: (linen) ``merged`` still holds adapters or equals the base where an
        adapter is not zero (never merged), or ``adapted`` holds no adapters.
    """
    if isinstance(adapted, nnx.Module):
        return _nnx.unmerge(merged, adapted)
    return _tree.unmerge(merged, adapted)
