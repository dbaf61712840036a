"""Every transformer family in google-tunix, built tiny with random float32 weights on CPU.

``build(name)`` returns a `Zoo`: the NNX module, example inputs for ``module(*inputs,
**kwargs)`` and a next-token cross-entropy ``loss(module, tokens)``, so tests can put LoRA on
third-party models that nothing here was written for. `PROJECTIONS` records, per family,
where every weight matrix lives and how the model consumes it.

Importing tunix has side effects this module undoes or contains:

* ``tunix.models.*.model`` calls ``flax.config.update("flax_always_shard_variable", False)``
  at import time, for the whole process. The flag is restored right after import, and
  models are built under ``nnx.use_eager_sharding(False)`` instead: tunix annotates every
  ``nnx.Param`` with ``sharding=("tp", "fsdp", ...)``, which with eager sharding on and no
  mesh fails with "An auto mesh context or metadata is required". The built Params keep
  that metadata (``out_sharding`` naming mesh axes "tp"/"fsdp") plus
  ``eager_sharding=False``.
* qwen2, qwen3 and gemma4 import ``jax.experimental.shard_map``, which warns
  (DeprecationWarning) at import; the import is done with warnings silenced. Building warns
  too ("'sharding' is deprecated") and is silenced the same way. Calling a model warns on
  every call ("'.value' access is now deprecated", "pxla.thread_resources is deprecated"),
  all attributed to tunix's modules: a test module using the zoo under this project's
  ``filterwarnings = ["error"]`` needs
  ``pytestmark = pytest.mark.filterwarnings(tunix_zoo.PYTEST_WARNINGS)``.

Every family's ``__call__`` takes ``(tokens, positions, cache, attention_mask)``
positionally and returns ``(logits, cache)``. The mask is ``[B, L, L]`` bool and must be
given: with ``None`` llama3/qwen2/qwen3 silently attend bidirectionally and the gemma
families raise.
Nothing here needs a TPU: flash/splash attention stays off (its default), remat is
``NONE``, tunix's ``shard()`` is a no-op on CPU, and the qwen3 MoE layer takes its dense
fallback (not megablox) when the platform is CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_shard_flag = flax.config.flax_always_shard_variable
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from tunix.models.gemma import model as gemma_lib
    from tunix.models.gemma3 import model as gemma3_lib
    from tunix.models.gemma4 import model as gemma4_lib
    from tunix.models.llama3 import model as llama3_lib
    from tunix.models.qwen2 import model as qwen2_lib
    from tunix.models.qwen3 import model as qwen3_lib
flax.config.update("flax_always_shard_variable", _shard_flag)

# Ignores the DeprecationWarnings tunix's own code raises on every call (see above).
PYTEST_WARNINGS = "ignore::DeprecationWarning:tunix"

# Shared tiny sizes. gemma4 uses 3 layers so that one of them reuses another's K/V.
VOCAB, EMBED, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 128, 32, 64, 4, 2, 8
LAYERS, BATCH, LENGTH = 2, 2, 8
EXPERTS, TOP_K, EXPERT_HIDDEN = 4, 2, 32
GEMMA4_GLOBAL_HEAD_DIM, GEMMA4_PER_LAYER_DIM, GEMMA4_SHARED_HIDDEN = 16, 8, 96
SLIDING_WINDOW = 4  # below LENGTH, so local layers really mask something

FAMILIES = (
    "llama3",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma3",
    "gemma4",
    "gemma4_moe",
)
# Not covered: gemma3 with ``vision_config`` (a SigLIP image encoder feeding soft tokens);
# every text path above runs on CPU, nothing was skipped for needing a TPU.


@dataclasses.dataclass(frozen=True)
class Zoo:
    """A built model, its example call and a next-token loss."""

    name: str
    module: nnx.Module
    config: Any
    inputs: tuple
    kwargs: dict
    tokens: jax.Array
    loss: Callable[[nnx.Module, jax.Array], jax.Array]

    def logits(self, module: nnx.Module | None = None) -> jax.Array:
        """Logits ``(batch, length, vocab)`` of ``module`` (default: this one) on `inputs`."""
        module = self.module if module is None else module
        return module(*self.inputs, **self.kwargs)[0]


def model_inputs(tokens: jax.Array) -> tuple:
    """``(tokens, positions, cache=None, causal mask [B, L, L])`` for any family.

    Only ``tokens.shape`` is read, so this also works on tracers inside a jitted loss.
    """
    batch, length = tokens.shape
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    mask = np.broadcast_to(np.tril(np.ones((length, length), bool)), (batch, length, length))
    return (tokens, jnp.asarray(positions), None, jnp.asarray(mask))


def next_token_loss(module: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from the logits."""
    logits = module(*model_inputs(tokens))[0]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), tokens[:, 1:]
    ).mean()


def _llama3(**overrides: Any):
    config = llama3_lib.ModelConfig(
        num_layers=LAYERS,
        vocab_size=VOCAB,
        embed_dim=EMBED,
        hidden_dim=HIDDEN,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS,
        rope_theta=10_000,
        norm_eps=1e-6,
        weight_tying=False,
    )
    return llama3_lib.Llama3, dataclasses.replace(config, **overrides)


def _qwen2(**overrides: Any):
    config = qwen2_lib.ModelConfig(
        num_layers=LAYERS,
        vocab_size=VOCAB,
        embed_dim=EMBED,
        hidden_dim=HIDDEN,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS,
        rope_theta=10_000,
        norm_eps=1e-6,
        use_tied_embedding=True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    return qwen2_lib.Qwen2, dataclasses.replace(config, **overrides)


def _qwen3(moe: bool, **overrides: Any):
    extra = {"num_experts": EXPERTS, "num_experts_per_tok": TOP_K} if moe else {}
    config = qwen3_lib.ModelConfig(
        num_layers=LAYERS,
        vocab_size=VOCAB,
        embed_dim=EMBED,
        hidden_dim=EXPERT_HIDDEN if moe else HIDDEN,  # per-expert width when moe
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS,
        rope_theta=10_000,
        norm_eps=1e-6,
        use_tied_embedding=not moe,  # like qwen3-0.6B (tied) and qwen3-30B-A3B (untied)
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        **extra,
    )
    return qwen3_lib.Qwen3, dataclasses.replace(config, **overrides)


def _gemma(**overrides: Any):
    kinds = gemma_lib.AttentionType
    config = gemma_lib.ModelConfig(  # gemma2-style: softcaps, post norms, local+global
        num_layers=LAYERS,
        num_embed=VOCAB,
        embed_dim=EMBED,
        hidden_dim=HIDDEN,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_kv_heads=HEADS,  # == num_heads: the fused qkv_einsum path
        final_logit_softcap=30.0,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        attention_types=(kinds.LOCAL_SLIDING, kinds.GLOBAL),
        attn_logits_soft_cap=50.0,
        sliding_window_size=SLIDING_WINDOW,
    )
    return gemma_lib.Gemma, dataclasses.replace(config, **overrides)


def _gemma3(**overrides: Any):
    config = gemma3_lib.ModelConfig(  # both layers local: the pattern is 5 local, 1 global
        num_layers=LAYERS,
        num_embed=VOCAB,
        embed_dim=EMBED,
        hidden_dim=HIDDEN,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS,  # < num_heads: separate q_einsum and kv_einsum
        sliding_window_size=SLIDING_WINDOW,
        global_base_frequency=1_000_000,
        param_dtype=jnp.float32,
    )
    return gemma3_lib.Gemma3, dataclasses.replace(config, **overrides)


def _gemma4(moe: bool, **overrides: Any):
    kinds = gemma4_lib.AttentionType
    common = {
        "num_embed": VOCAB,
        "embed_dim": EMBED,
        "hidden_dim": HIDDEN,
        "num_heads": HEADS,
        "head_dim": HEAD_DIM,
        "num_kv_heads": KV_HEADS,
        "sliding_window_size": SLIDING_WINDOW,
        "global_key_size": GEMMA4_GLOBAL_HEAD_DIM,  # global layers use a wider head
        "param_dtype": jnp.float32,
        "dtype": jnp.float32,
    }
    if moe:  # like gemma4-26B-A4B: MoE beside a dense MLP, K doubles as V in global layers
        config = gemma4_lib.ModelConfig(
            num_layers=LAYERS,
            attention_pattern=(kinds.LOCAL_SLIDING, kinds.GLOBAL),
            num_global_kv_heads=1,
            k_eq_v_global=True,
            enable_moe=True,
            num_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            expert_dim=EXPERT_HIDDEN,
            **common,
        )
    else:  # like gemma4-E2B: per-layer inputs, and layer 2 reuses layer 0's K/V
        config = gemma4_lib.ModelConfig(
            num_layers=3,
            attention_pattern=(kinds.LOCAL_SLIDING, kinds.GLOBAL, kinds.LOCAL_SLIDING),
            per_layer_input_dim=GEMMA4_PER_LAYER_DIM,
            frac_shared_layers=1 / 3,
            override_kv_shared_ffw_hidden=GEMMA4_SHARED_HIDDEN,
            **common,
        )
    return gemma4_lib.Gemma4, dataclasses.replace(config, **overrides)


# Families whose RMSNorm computes ``x * (1 + scale)``: their neutral scale is 0, not 1.
_ONE_PLUS_SCALE_NORMS = ("gemma", "gemma3")

_BUILDERS: dict[str, Callable[..., tuple[type, Any]]] = {
    "llama3": _llama3,
    "qwen2": _qwen2,
    "qwen3": lambda **kw: _qwen3(False, **kw),
    "qwen3_moe": lambda **kw: _qwen3(True, **kw),
    "gemma": _gemma,
    "gemma3": _gemma3,
    "gemma4": lambda **kw: _gemma4(False, **kw),
    "gemma4_moe": lambda **kw: _gemma4(True, **kw),
}


def _random_init(module: nnx.Module, name: str, seed: int) -> None:
    """Fill every Param of an abstract (``nnx.eval_shape``) module from numpy's RNG.

    Matrices get N(0, 1/EMBED) so logits are O(1); 1-D params (norm scales, biases, gemma4's
    skip/expert/router scales) get their neutral value plus N(0, 0.1^2) noise. tunix's own
    init is not used: it zeroes every MLP kernel (dead MLP output, zero gradients into
    gate/up), its scales differ per family (qwen2's embedding has std 1, loss ~30), and on
    CPU its hundreds of small eager ops cost seconds of compilation per family.
    """
    rng = np.random.default_rng(seed)
    nodes = dict(nnx.iter_graph(module))
    for path, var in nodes.items():
        if not isinstance(var, nnx.Param):
            continue
        spec = var.get_value()
        noise = rng.standard_normal(spec.shape)
        if len(spec.shape) >= 2:
            value = noise * EMBED**-0.5
        else:
            zero_centred = str(path[-1]).endswith("_bias") or (
                name in _ONE_PLUS_SCALE_NORMS and type(nodes[path[:-1]]).__name__ == "RMSNorm"
            )
            value = (0.0 if zero_centred else 1.0) + 0.1 * noise
        var.set_value(jnp.asarray(value, spec.dtype))


def build(name: str, seed: int = 0, **config_overrides: Any) -> Zoo:
    """Build family ``name`` tiny, random and float32; overrides go to its ModelConfig."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    cls, config = _BUILDERS[name](**config_overrides)
    with nnx.use_eager_sharding(False), warnings.catch_warnings():
        # tunix passes ``nnx.Param(..., sharding=...)``: "'sharding' is deprecated".
        warnings.simplefilter("ignore", DeprecationWarning)
        module = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(params=seed)))
    _random_init(module, name, seed)
    vocab = getattr(config, "vocab_size", None) or config.num_embed
    rng = np.random.default_rng(seed + 1)
    tokens = jnp.asarray(rng.integers(0, vocab, (BATCH, LENGTH)), jnp.int32)
    return Zoo(name, module, config, model_inputs(tokens), {}, tokens, next_token_loss)


# ---------------------------------------------------------------------------------------
# Where the weights are and how they are consumed (tunix 0.1.7, checked against the source).
# `PROJECTIONS` lists them for the default configs; ``build`` overrides can change both the
# paths (e.g. weight tying removes ``lm_head``) and the shapes.
#
# Common to all families:
# * Token embedding: ``embedder.input_embedding`` (V, D), a bare Param read by gather,
#   ``input_embedding[(tokens,)]`` (gemma/gemma3/gemma4 then multiply by sqrt(D)). The tied
#   output head (gemma*, qwen2 and qwen3 here, llama3 with ``weight_tying=True``) is
#   ``embedder.decode``: ``jnp.dot(x, input_embedding.T)`` -- the SAME Param, transposed,
#   so it is consumed twice. Untied heads are ``lm_head``, an Einsum "BTD,DV->BTV".
# * Attention projections are the family's own ``Einsum`` module (one per file, not
#   ``nnx.Einsum``): ``jnp.einsum(einsum_str, x, self.w.value)`` with the Param at ``.w``
#   (qwen2/qwen3/gemma4 cast x and w to ``config.dtype`` first; gemma4's may multiply w by
#   a constant ``w_scale`` first). No bias inside; the weight is never sliced beforehand.
# * Dense MLPs are ``nnx.Linear(use_bias=False)`` gate_proj/up_proj/down_proj,
#   ``act(gate(x)) * up(x) -> down`` (silu for llama3/qwen, gelu for gemma*).
# * Norm scales (RMSNorm ``w`` or ``scale``) are left out of `PROJECTIONS`.
#
# Per family (D embed, N heads, K kv heads, H head dim, F mlp hidden, V vocab, E experts):
# * llama3, qwen3: q/k/v/o_proj Einsums "BTD,DNH->BTNH", "BSD,DKH->BSKH" (k and v),
#   "BTNH,NHD->BTD". qwen3 adds per-head RMSNorms ``q_norm``/``k_norm`` on the outputs.
# * qwen2: as llama3, plus bare Params ``attn/q_bias`` (N*H,), ``k_bias``, ``v_bias`` (K*H,)
#   added after reshaping the einsum output to (B, T, heads*H) and back.
# * qwen3_moe: ``layers/i/mlp`` is a MoELayer: ``router`` nnx.Linear (D, E), top-k of its
#   softmax; expert weights are bare Params gate_proj/up_proj (E, D, F), down_proj
#   (E, F, D). On CPU (or with no mesh) a Python loop over experts slices ``w[i]`` and runs
#   "BTD,DF->BTF" / "BTF,FD->BTD" over every token, then mixes with one-hot routing weights
#   ("BTED,BTEK->BTD"). With a TPU mesh it is ``megablox.gmm`` (not ragged_dot).
# * gemma: heads == kv heads, so a fused ``qkv_einsum`` (3, N, D, H) "BTD,SNDH->SBTNH"
#   whose OUTPUT is unpacked into q, k, v (with fewer kv heads it is q_einsum + kv_einsum
#   as in gemma3). ``attn_vec_einsum`` (N, H, D) "BTNH,NHD->BTD" is the output projection.
# * gemma3: ``q_einsum`` (N, D, H) "BTD,NDH->BTNH", ``kv_einsum`` (2, K, D, H)
#   "BSD,CKDH->CBSKH" (output unpacked into k, v), ``attn_vec_einsum``; qkv_einsum when
#   heads == kv heads, as gemma. Query/key norms are ``_query_norm``/``_key_norm``.
# * gemma4: q_einsum, kv_einsum and attn_vec_einsum as gemma3, with head dim
#   ``global_key_size`` in global layers. With ``k_eq_v_global`` global layers have
#   ``k_einsum`` (K, D, H) "BSD,KDH->BSKH" and its output is used as BOTH key and value.
#   KV-shared layers (here layer 2, reusing layer 0's K/V) still own a kv_einsum that is
#   never called: its gradient is exactly zero. Per-layer inputs: ``embedder``'s
#   ``per_layer_model_projection`` Einsum (D, L, P) "BTD,DNP->BTNP" with
#   ``w_scale = D**-0.5`` and a bare Param ``per_layer_input_embedding`` (V, L, P) read by
#   gather ``value[tokens]``; per layer ``per_layer_input_gate`` (D, P) "BTD,DP->BTP" and
#   ``per_layer_projection`` (P, D) "BTP,PD->BTD". ``skip_scale`` (1,) scales each layer.
# * gemma4_moe: ``layers/i/moe`` (MoERagged) sits beside the dense ``mlp``. Router:
#   ``router_logits`` (D, E) in einsum "gsd,de->gse" on rms(x) * D**-0.5 * router_scale,
#   ``approx_max_k``. ``gating_einsum`` (E, 2, F, D) is TRANSPOSED (0, 3, 1, 2) and
#   RESHAPED to (E, D, 2F) and fed to ``jax.lax.ragged_dot`` over expert-sorted tokens;
#   the output is split into gate and up. ``linear`` (E, F, D) goes to ragged_dot as is.
#   ``per_expert_scale`` (E,) is gathered per row and multiplied in.
# ---------------------------------------------------------------------------------------


class Site(NamedTuple):
    """One weight of a built model and how its owner consumes it.

    ``path`` is the "/"-joined attribute path of the owning module from the root and
    ``param`` the Param's attribute on it. ``kind``: ``"nnx.Linear"`` (flax's layer,
    ``param="kernel"``, ``lax.dot_general`` of the input's last axis with kernel axis 0),
    ``"Einsum"`` (the family's own module: ``jnp.einsum(op, x, w)``, ``param="w"``) or
    ``"Param"`` (a bare Param used inline by its owner; ``op`` says how). ``role`` is one
    of attn, bias, mlp, router, expert, embed, head, per_layer. ``shape`` is as built here.
    """

    path: str
    param: str
    kind: str
    role: str
    op: str
    shape: tuple[int, ...]


_D, _F, _H, _N, _K, _V = EMBED, HIDDEN, HEAD_DIM, HEADS, KV_HEADS, VOCAB
_E, _FE, _P, _GH = EXPERTS, EXPERT_HIDDEN, GEMMA4_PER_LAYER_DIM, GEMMA4_GLOBAL_HEAD_DIM
_GATHER = "gather input_embedding[(tokens,)]"
_GATHER_SCALED = _GATHER + " * sqrt(D)"
_TIED = "; tied head: jnp.dot(x, input_embedding.T) (same Param, transposed, used twice)"


def _einsum(path: str, role: str, op: str, shape: tuple[int, ...]) -> Site:
    return Site(path, "w", "Einsum", role, op, shape)


def _mlp(i: int, hidden: int = _F) -> tuple[Site, ...]:
    prefix = f"layers/{i}/mlp"
    return (
        Site(f"{prefix}/gate_proj", "kernel", "nnx.Linear", "mlp", "x @ kernel", (_D, hidden)),
        Site(f"{prefix}/up_proj", "kernel", "nnx.Linear", "mlp", "x @ kernel", (_D, hidden)),
        Site(f"{prefix}/down_proj", "kernel", "nnx.Linear", "mlp", "x @ kernel", (hidden, _D)),
    )


def _llama_attn(i: int) -> tuple[Site, ...]:
    prefix = f"layers/{i}/attn"
    return (
        _einsum(f"{prefix}/q_proj", "attn", "BTD,DNH->BTNH", (_D, _N, _H)),
        _einsum(f"{prefix}/k_proj", "attn", "BSD,DKH->BSKH", (_D, _K, _H)),
        _einsum(f"{prefix}/v_proj", "attn", "BSD,DKH->BSKH", (_D, _K, _H)),
        _einsum(f"{prefix}/o_proj", "attn", "BTNH,NHD->BTD", (_N, _H, _D)),
    )


def _qwen2_biases(i: int) -> tuple[Site, ...]:
    prefix = f"layers/{i}/attn"
    op = "reshape(proj, (B, T, heads*H)) + bias"
    return (
        Site(prefix, "q_bias", "Param", "bias", op, (_N * _H,)),
        Site(prefix, "k_bias", "Param", "bias", op, (_K * _H,)),
        Site(prefix, "v_bias", "Param", "bias", op, (_K * _H,)),
    )


def _qwen3_moe(i: int) -> tuple[Site, ...]:
    prefix = f"layers/{i}/mlp"
    loop = "CPU: for expert i, jnp.einsum('{}', h, w[i]) over all tokens (w sliced)"
    return (
        Site(f"{prefix}/router", "kernel", "nnx.Linear", "router", "x @ kernel", (_D, _E)),
        Site(prefix, "gate_proj", "Param", "expert", loop.format("BTD,DF->BTF"), (_E, _D, _FE)),
        Site(prefix, "up_proj", "Param", "expert", loop.format("BTD,DF->BTF"), (_E, _D, _FE)),
        Site(prefix, "down_proj", "Param", "expert", loop.format("BTF,FD->BTD"), (_E, _FE, _D)),
    )


def _gemma_attn(i: int, kv_heads: int = _K, head_dim: int = _H) -> tuple[Site, ...]:
    prefix, heads = f"layers/{i}/attn", _N
    out = _einsum(f"{prefix}/attn_vec_einsum", "attn", "BTNH,NHD->BTD", (heads, head_dim, _D))
    if heads == kv_heads:
        shape = (3, heads, _D, head_dim)
        return (_einsum(f"{prefix}/qkv_einsum", "attn", "BTD,SNDH->SBTNH", shape), out)
    return (
        _einsum(f"{prefix}/q_einsum", "attn", "BTD,NDH->BTNH", (heads, _D, head_dim)),
        _einsum(f"{prefix}/kv_einsum", "attn", "BSD,CKDH->CBSKH", (2, kv_heads, _D, head_dim)),
        out,
    )


def _gemma4_moe(i: int) -> tuple[Site, ...]:
    prefix = f"layers/{i}/moe"
    return (
        Site(prefix, "router_logits", "Param", "router", "einsum('gsd,de->gse')", (_D, _E)),
        Site(
            prefix,
            "gating_einsum",
            "Param",
            "expert",
            "transpose (0,3,1,2), reshape (E, D, 2F), ragged_dot; output split gate/up",
            (_E, 2, _FE, _D),
        ),
        Site(prefix, "linear", "Param", "expert", "ragged_dot(h, w)", (_E, _FE, _D)),
    )


def _gemma4_dense() -> tuple[Site, ...]:
    sites: list[Site] = [
        Site("embedder", "input_embedding", "Param", "embed", _GATHER_SCALED + _TIED, (_V, _D)),
        Site(
            "embedder",
            "per_layer_input_embedding",
            "Param",
            "per_layer",
            "gather value[tokens] * sqrt(P)",
            (_V, 3, _P),
        ),
        Site(
            "embedder/per_layer_model_projection",
            "w",
            "Einsum",
            "per_layer",
            "BTD,DNP->BTNP (w * D**-0.5 first)",
            (_D, 3, _P),
        ),
    ]
    for i, head_dim in enumerate((_H, _GH, _H)):
        sites += _gemma_attn(i, head_dim=head_dim)
        sites += _mlp(i, GEMMA4_SHARED_HIDDEN if i == 2 else _F)
        sites += [
            _einsum(f"layers/{i}/per_layer_input_gate", "per_layer", "BTD,DP->BTP", (_D, _P)),
            _einsum(f"layers/{i}/per_layer_projection", "per_layer", "BTP,PD->BTD", (_P, _D)),
        ]
    return tuple(sites)


def _gemma4_sparse() -> tuple[Site, ...]:
    sites: list[Site] = [
        Site("embedder", "input_embedding", "Param", "embed", _GATHER_SCALED + _TIED, (_V, _D))
    ]
    sites += _gemma_attn(0)
    sites += [
        _einsum("layers/1/attn/q_einsum", "attn", "BTD,NDH->BTNH", (_N, _D, _GH)),
        _einsum("layers/1/attn/k_einsum", "attn", "BSD,KDH->BSKH (k AND v)", (1, _D, _GH)),
        _einsum("layers/1/attn/attn_vec_einsum", "attn", "BTNH,NHD->BTD", (_N, _GH, _D)),
    ]
    for i in range(LAYERS):
        sites += _mlp(i) + _gemma4_moe(i)
    return tuple(sites)


def _per_layer(*makers: Callable[[int], tuple[Site, ...]]) -> tuple[Site, ...]:
    return tuple(site for i in range(LAYERS) for make in makers for site in make(i))


PROJECTIONS: dict[str, tuple[Site, ...]] = {
    "llama3": (
        Site("embedder", "input_embedding", "Param", "embed", _GATHER, (_V, _D)),
        *_per_layer(_llama_attn, _mlp),
        _einsum("lm_head", "head", "BTD,DV->BTV", (_D, _V)),
    ),
    "qwen2": (
        Site("embedder", "input_embedding", "Param", "embed", _GATHER + _TIED, (_V, _D)),
        *_per_layer(_llama_attn, _qwen2_biases, _mlp),
    ),
    "qwen3": (
        Site("embedder", "input_embedding", "Param", "embed", _GATHER + _TIED, (_V, _D)),
        *_per_layer(_llama_attn, _mlp),
    ),
    "qwen3_moe": (
        Site("embedder", "input_embedding", "Param", "embed", _GATHER, (_V, _D)),
        *_per_layer(_llama_attn, _qwen3_moe),
        _einsum("lm_head", "head", "BTD,DV->BTV", (_D, _V)),
    ),
    "gemma": (
        Site("embedder", "input_embedding", "Param", "embed", _GATHER_SCALED + _TIED, (_V, _D)),
        *_per_layer(functools.partial(_gemma_attn, kv_heads=_N), _mlp),
    ),
    "gemma3": (
        Site("embedder", "input_embedding", "Param", "embed", _GATHER_SCALED + _TIED, (_V, _D)),
        *_per_layer(_gemma_attn, _mlp),
    ),
    "gemma4": _gemma4_dense(),
    "gemma4_moe": _gemma4_sparse(),
}

# Weights that exist but never reach the loss for the default configs here.
UNUSED: dict[str, tuple[str, ...]] = {
    # Layer 2 reuses layer 0's K/V: its kv_einsum and key norm are never called.
    "gemma4": ("layers/2/attn/kv_einsum/w", "layers/2/attn/_key_norm/scale"),
}
