"""What a LoRA adapter adds to one mixture-of-experts matmul (``jax.lax.ragged_dot``).

Run from the repository root::

    python -m experiments.moe_adapter_cost        # 2048 routed tokens, 512 -> 1024, 4 experts, r=8
    python -m experiments.moe_adapter_cost --experts 8 --reps 30

Times the forward and backward pass of one expert matmul ``ragged_dot(x, W, group_sizes)``
(tokens sorted by expert, ``W`` ``(experts, in, out)`` frozen; the layer is
``gpt2_einsum.Experts``, as in ``--model gpt2-moe``), three ways, interleaved:

- ``frozen``: no adapter; the gradient of ``x`` only (the floor of a LoRA step);
- ``jaxlora``: the layer adapted by ``jaxlora.lorafy`` (A ``(experts, in, r)``, B
  ``(experts, r, out)``), gradients of ``x``, A and B. On CPU jaxlora computes the adapter as
  ``x @ [A_1 ... A_E]`` (one dense dot), each token keeping its own expert's ``r`` columns,
  then one dense dot with the stacked B;
- ``ragged``: the same adapter and gradients as two more ``ragged_dot`` (``x A_e``, then
  ``B_e``), the form jaxlora uses where ``ragged_dot`` is a grouped kernel (GPU, TPU).

XLA:CPU lowers ``ragged_dot`` as a dense dot over every expert of a masked copy of its input
(``experts x tokens x features``), so each ragged_dot an adapter adds costs a copy of that size;
the dense form only masks the ``tokens x experts x r`` product. The script checks that both
adapted forms give the same gradients.
"""

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from experiments.gpt2_einsum import Experts


def ragged_delta(x: jax.Array, a: jax.Array, b: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``x_t @ A_e @ B_e`` for each token ``t`` of expert ``e``, as two ``ragged_dot``.

    Args:
        x: ``(tokens, in)``, sorted by expert.
        a: ``(experts, in, r)``.
        b: ``(experts, r, out)``.
        group_sizes: ``(experts,)`` tokens per expert.

    Returns:
        ``(tokens, out)``.
    """
    return jax.lax.ragged_dot(jax.lax.ragged_dot(x, a, group_sizes), b, group_sizes)


def setups(args: argparse.Namespace) -> tuple[dict[str, Callable], tuple]:
    """The three jitted gradient functions and their common arguments."""
    key_x, key_w, key_b, key_ct = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(key_x, (args.tokens, args.d_in))
    counts = np.random.default_rng(0).multinomial(args.tokens, [1 / args.experts] * args.experts)
    group_sizes = jnp.asarray(counts, jnp.int32)
    layer = Experts((args.experts, args.d_in, args.d_out))
    params = layer.init(key_w, x, group_sizes)["params"]
    cfg = jaxlora.LoraConfig(rank=args.rank, alpha=args.rank, targets=["w"])  # scale 1
    lora_layer, lora_params = jaxlora.lorafy(layer, params, cfg, x, group_sizes, key=key_w)
    adapter = lora_params["lora_w"]
    trained = {"a": adapter.a, "b": jax.random.normal(key_b, adapter.b.shape) * 0.02}
    cotangent = jax.random.normal(key_ct, (args.tokens, args.d_out))

    def with_factors(t: dict) -> dict:
        return {**lora_params, "lora_w": dataclasses.replace(adapter, a=t["a"], b=t["b"])}

    def frozen(x, t):
        return jax.grad(
            lambda x: jnp.vdot(layer.apply({"params": params}, x, group_sizes), cotangent)
        )(x)

    def adapted(x, t):
        def loss(x, t):
            return jnp.vdot(
                lora_layer.apply({"params": with_factors(t)}, x, group_sizes), cotangent
            )

        return jax.grad(loss, argnums=(0, 1))(x, t)

    def ragged(x, t):
        def loss(x, t):
            y = layer.apply({"params": params}, x, group_sizes)
            return jnp.vdot(y + ragged_delta(x, t["a"], t["b"], group_sizes), cotangent)

        return jax.grad(loss, argnums=(0, 1))(x, t)

    fns = {"frozen": jax.jit(frozen), "jaxlora": jax.jit(adapted), "ragged": jax.jit(ragged)}
    return fns, (x, trained)


def main(argv: Sequence[str] | None = None) -> None:
    """Prints a markdown table: median milliseconds, ratio to ``frozen``, XLA's GFLOP."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="routed tokens (default: 2048)")
    p.add_argument("--d-in", type=int, default=512, help="default: 512")
    p.add_argument("--d-out", type=int, default=1024, help="default: 1024")
    p.add_argument("--experts", type=int, default=4, help="default: 4")
    p.add_argument("--rank", type=int, default=8, help="default: 8")
    p.add_argument("--reps", type=int, default=15, help="interleaved timed calls (default: 15)")
    args = p.parse_args(argv)
    fns, call_args = setups(args)
    chex.assert_trees_all_close(
        fns["jaxlora"](*call_args), fns["ragged"](*call_args), rtol=1e-4, atol=1e-4
    )
    gflops = {
        n: f.lower(*call_args).compile().cost_analysis()["flops"] / 1e9 for n, f in fns.items()
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for f in fns.values():  # warm up
        jax.block_until_ready(f(*call_args))
    for _ in range(args.reps):
        for name, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*call_args))
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["frozen"])
    print("| variant | median ms | x frozen | GFLOP |")
    print("|---|--:|--:|--:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {med / floor:.2f} | {gflops[name]:.2f} |")


if __name__ == "__main__":
    main()
