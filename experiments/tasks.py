"""The fine-tuning tasks of ``experiments/finetune.py``: a pretrained model, data, loss, metrics.

* ``rotten_tomatoes``: sentiment classification with a BERT encoder and a new ``classifier``
  head (``BertForSequenceClassification``); metric: dev accuracy. ``subjectivity``: the same
  model and head on the same corpus's plot synopses vs reviews.
* ``hamlet``: next-token prediction with a Llama decoder; metrics: validation loss and
  perplexity, plus a greedy continuation of a validation prompt. ``debates``: the same on
  the 2016 presidential debates transcript.

Losses and metrics take the ``apply`` function as an argument, so the same task trains a
LoRA-adapted model (``lora_model.apply``) and the plain one (``model.apply``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec
from tokenizers import Tokenizer

from experiments import data
from experiments.models import loading
from experiments.models.bert import BertForSequenceClassification, init_classification_params
from experiments.models.llama import LlamaForCausalLM, generate

Params = dict[str, Any]
Batch = Mapping[str, jax.Array]
Apply = Callable[..., jax.Array]

PRESETS = {
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", loading.minilm_path),
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", loading.smollm2_gguf_path),
}
"""Model presets: name -> (Hugging Face id recorded in exports, local file locator)."""

FAMILY_DATA = {"bert": ("rotten_tomatoes", "subjectivity"), "llama": ("hamlet", "debates")}
"""The datasets each model family is fine-tuned on; the first is its default."""
DATASETS = tuple(name for names in FAMILY_DATA.values() for name in names)
DEFAULT_DATA = {family: names[0] for family, names in FAMILY_DATA.items()}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = {"bert": ("query", "value"), "llama": LLAMA_LINEARS}
"""q,v suffice for classification; next-token prediction needs every block linear (on Hamlet,
q,v at rank 8 recovered 69% of full fine-tuning's loss reduction, all seven 95%)."""
_COLUMNS, _ROWS = PartitionSpec(None, "model"), PartitionSpec("model", None)
TENSOR_PARALLEL = {
    "bert": (
        ("re:.*/(query|key|value|intermediate/dense)/kernel", _COLUMNS),
        (r"re:.*/(attention/output|layer_\d+/output)/dense/kernel", _ROWS),
    ),
    "llama": (
        ("re:.*/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", _COLUMNS),
        ("re:.*/(o_proj|down_proj)/kernel", _ROWS),
    ),
}
"""Megatron-style kernel shardings over a ``model`` mesh axis: column-parallel projections
in, row-parallel out; other leaves are replicated."""
PROMPT_TOKENS, SAMPLE_TOKENS = 24, 32


@dataclasses.dataclass(frozen=True)
class Budget:
    """Default training budget of a dataset (each field is a CLI flag).

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per step.
        seq_len: Tokens per example.
        lr_lora: Peak learning rate for LoRA.
        lr_full: Peak learning rate for full fine-tuning.
        eval_every: Steps between evaluations.
    """

    steps: int
    batch_size: int
    seq_len: int
    lr_lora: float
    lr_full: float
    eval_every: int


BUDGETS = {
    "rotten_tomatoes": Budget(300, 16, 64, 1e-3, 5e-5, 100),
    "subjectivity": Budget(300, 16, 64, 1e-3, 5e-5, 100),
    "hamlet": Budget(100, 4, 128, 5e-4, 5e-5, 50),
    "debates": Budget(100, 4, 128, 5e-4, 5e-5, 50),
}


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded pretrained model.

    Attributes:
        name: Short name for run directories (``minilm``, ``smollm2`` or the path's stem).
        source: Hugging Face id or local path, recorded in PEFT exports.
        family: ``"bert"`` or ``"llama"``.
        config: The model's ``BertConfig`` or ``LlamaConfig``.
        params: ``BertModel`` body params (bert) or ``LlamaForCausalLM`` params (llama).
        tokenizer: Its tokenizer.
    """

    name: str
    source: str
    family: str
    config: Any
    params: Params
    tokenizer: Tokenizer


def _load_path(name: str, source: str, path: Path, quantize: str | None) -> Pretrained:
    if path.suffix == ".gguf":
        config, params, tokenizer = loading.load_smollm2_gguf(path, quantize)
        return Pretrained(name, source, "llama", config, params, tokenizer)
    family, config, params, tokenizer = loading.load_hf_model(path, quantize)
    return Pretrained(name, source, family, config, params, tokenizer)


def load_pretrained(model: str, quantize: str | None = None) -> Pretrained:
    """Loads a preset or a local model.

    Args:
        model: ``"minilm"``, ``"smollm2"``, a Hugging Face model directory (BERT or Llama,
            with ``config.json``, ``model.safetensors``, ``tokenizer.json``) or a llama
            ``.gguf`` file.
        quantize: store every Dense kernel quantized (``"nf4"``, ``"int8"``) as it is read.

    Returns:
        The loaded model.

    Raises:
        ValueError: For a name that is neither a preset nor an existing path, or an
            unsupported model family.
        ModuleNotFoundError: If a preset's package is not installed (the message says what
            to install).
    """
    if model in PRESETS:
        source, locate = PRESETS[model]
        return _load_path(model, source, locate(), quantize)
    path = Path(model)
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return _load_path(path.stem, str(path.absolute()), path, quantize)
    raise ValueError(
        f"unknown model {model!r}: use one of {sorted(PRESETS)}, a Hugging Face model "
        "directory (BERT or Llama) or a llama .gguf file."
    )


@dataclasses.dataclass(frozen=True)
class Task:
    """A model with its initial params, its data, and how to train and evaluate it.

    Attributes:
        data_name: One of `DATASETS`.
        model: The flax module.
        params: Its initial params (pretrained body; a new head for classification).
        train: Training arrays, each ``(n, ...)``, for ``data.next_batch``.
        eval: Evaluation arrays, each ``(m, ...)``.
        loss: ``loss(apply, params, batch, rng) -> ()`` mean training loss; ``rng`` drives
            dropout.
        eval_sums: ``eval_sums(apply, params, batch) -> {name: ()}``, sums over the rows of a
            batch weighted by ``batch["weight"]`` (0 on padding rows); see `metrics_of`.
            It is ``sums_of(logits(apply, params, batch), batch)``.
        logits: ``logits(apply, params, batch)``, the model's output on a batch, without
            dropout (``(b, classes)`` or ``(b, seq, vocab)``).
        sums_of: ``sums_of(logits, batch) -> {name: ()}``, the sums of `eval_sums`.
        metric: The headline metric (``"accuracy"`` or ``"perplexity"``).
        unit: What throughput counts: ``"ex"`` (examples) or ``"tok"`` (tokens).
        units_per_example: How many of ``unit`` one example holds.
        modules_to_save: Modules trained in full under LoRA (a new head).
        peft_task_type: PEFT ``task_type`` of exports.
        tensor_parallel: ``(pattern, PartitionSpec)`` pairs for ``jaxlora.shard_params``.
        sample: ``sample(params) -> text``, a greedy continuation of a held-out prompt by the
            plain model with ``params`` (None for classification).
    """

    data_name: str
    model: nn.Module
    params: Params
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    loss: Callable[[Apply, Params, Batch, jax.Array], jax.Array]
    eval_sums: Callable[[Apply, Params, Batch], dict[str, jax.Array]]
    logits: Callable[[Apply, Params, Batch], jax.Array]
    sums_of: Callable[[jax.Array, Batch], dict[str, jax.Array]]
    metric: str
    unit: str
    units_per_example: int
    modules_to_save: tuple[str, ...]
    peft_task_type: str
    tensor_parallel: tuple[tuple[str, PartitionSpec], ...]
    sample: Callable[[Params], str] | None = None


def metrics_of(sums: Mapping[str, float]) -> dict[str, float]:
    """Turns summed evaluation statistics into metrics.

    Args:
        sums: ``{"loss": summed loss, "count": rows or tokens}`` and, for classification,
            ``"correct"``.

    Returns:
        ``{"loss", "accuracy"}`` for classification, ``{"loss", "perplexity"}`` for language
        modelling.
    """
    loss = sums["loss"] / sums["count"]
    if "correct" in sums:
        return {"loss": loss, "accuracy": sums["correct"] / sums["count"]}
    return {"loss": loss, "perplexity": math.exp(loss)}


# ----------------------------------------------------------------------------- classification


def _classify(apply: Apply, params: Params, batch: Batch, rng: jax.Array | None) -> jax.Array:
    return apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )


def classification_loss(apply: Apply, params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
    """Mean cross-entropy of a batch, with dropout.

    Args:
        apply: ``model.apply`` (or ``lora_model.apply``).
        params: Its params.
        batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` ``(b, seq)``; ``labels``
            ``(b,)``.
        rng: Dropout key.

    Returns:
        The scalar loss.
    """
    logits = _classify(apply, params, batch, rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def classification_logits(apply: Apply, params: Params, batch: Batch) -> jax.Array:
    """``(b, classes)`` logits of a batch, without dropout."""
    return _classify(apply, params, batch, None)


def classification_sums_of(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Weighted sums of loss and correct predictions over a batch.

    Args:
        logits: ``(b, classes)``, from `classification_logits`.
        batch: ``labels`` and ``weight`` ``(b,)``.

    Returns:
        ``{"loss", "correct", "count"}`` scalars.
    """
    weight = batch["weight"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = jnp.argmax(logits, axis=-1) == batch["labels"]
    return {"loss": nll @ weight, "correct": correct @ weight, "count": weight.sum()}


def classification_sums(apply: Apply, params: Params, batch: Batch) -> dict[str, jax.Array]:
    """`classification_sums_of` the `classification_logits` of a batch (with ``weight``)."""
    return classification_sums_of(classification_logits(apply, params, batch), batch)


def _tokenized(tokenizer: Tokenizer, split: data.TextSplit, seq_len: int) -> dict[str, np.ndarray]:
    return {**data.tokenize_texts(tokenizer, split.texts, seq_len), "labels": split.labels}


def classification_task(
    pretrained: Pretrained, data_name: str, seq_len: int, key: jax.Array
) -> Task:
    """Two-class classification of Rotten Tomatoes texts with a BERT encoder and a new head.

    Args:
        pretrained: A ``bert`` model.
        data_name: ``rotten_tomatoes`` (sentiment) or ``subjectivity``.
        seq_len: Tokens per text (padded or truncated).
        key: PRNG key for the head (the same key gives the same head for either task).

    Returns:
        The task; ``eval`` is the dev split (movies disjoint from train).
    """
    load = {"rotten_tomatoes": data.load_rotten_tomatoes, "subjectivity": data.load_subjectivity}
    train, dev = load[data_name]()
    num_labels = 2
    return Task(
        data_name=data_name,
        model=BertForSequenceClassification(pretrained.config, num_labels),
        params=init_classification_params(pretrained.config, pretrained.params, num_labels, key),
        train=_tokenized(pretrained.tokenizer, train, seq_len),
        eval=_tokenized(pretrained.tokenizer, dev, seq_len),
        loss=classification_loss,
        eval_sums=classification_sums,
        logits=classification_logits,
        sums_of=classification_sums_of,
        metric="accuracy",
        unit="ex",
        units_per_example=1,
        modules_to_save=("classifier",),
        peft_task_type="SEQ_CLS",
        tensor_parallel=TENSOR_PARALLEL["bert"],
    )


# ----------------------------------------------------------------------------- language modelling


def _lm_logits(apply: Apply, params: Params, tokens: jax.Array, rng: jax.Array | None):
    rngs = None if rng is None else {"dropout": rng}
    return apply({"params": params}, tokens[:, :-1], rngs=rngs)


def _token_nll(apply: Apply, params: Params, tokens: jax.Array, rng: jax.Array | None) -> jax.Array:
    logits = _lm_logits(apply, params, tokens, rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def lm_loss(apply: Apply, params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of a batch of windows.

    Args:
        apply: ``model.apply`` (or ``lora_model.apply``).
        params: Its params.
        batch: ``tokens`` ``(b, seq + 1)``; inputs are ``[:, :-1]``, targets ``[:, 1:]``.
        rng: Dropout key (used by LoRA dropout only; Llama itself has none).

    Returns:
        The scalar loss.
    """
    return _token_nll(apply, params, batch["tokens"], rng).mean()


def lm_logits(apply: Apply, params: Params, batch: Batch) -> jax.Array:
    """``(b, seq, vocab)`` next-token logits of a batch of windows ``tokens`` ``(b, seq + 1)``."""
    return _lm_logits(apply, params, batch["tokens"], None)


def lm_sums_of(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Weighted sums of next-token loss over a batch of windows.

    Args:
        logits: ``(b, seq, vocab)``, from `lm_logits`.
        batch: ``tokens`` ``(b, seq + 1)`` and ``weight`` ``(b,)``.

    Returns:
        ``{"loss", "count"}`` scalars, summed over predicted tokens.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
    weight = batch["weight"]
    return {"loss": nll.sum(axis=-1) @ weight, "count": weight.sum() * nll.shape[-1]}


def lm_sums(apply: Apply, params: Params, batch: Batch) -> dict[str, jax.Array]:
    """`lm_sums_of` the `lm_logits` of a batch (with ``weight``)."""
    return lm_sums_of(lm_logits(apply, params, batch), batch)


def _sampler(model: LlamaForCausalLM, tokenizer: Tokenizer, prompt: np.ndarray):
    eos = model.config.eos_token_id
    eos = eos if isinstance(eos, int) else None

    def sample(params: Params) -> str:
        ids = generate(model, params, prompt[None], np.array([len(prompt)]), SAMPLE_TOKENS, eos)
        return tokenizer.decode(prompt.tolist() + np.asarray(ids[0]).tolist())

    return sample


def lm_task(pretrained: Pretrained, data_name: str, seq_len: int) -> Task:
    """Next-token prediction on a long text with a Llama decoder.

    Args:
        pretrained: A ``llama`` model.
        data_name: ``hamlet`` or ``debates``.
        seq_len: Predicted tokens per window.

    Returns:
        The task; ``eval`` holds the windows of the last 10% of the text, and ``sample``
        continues the first `PROMPT_TOKENS` tokens of that part.
    """
    load = {"hamlet": data.load_hamlet, "debates": data.load_debates}
    stream = data.encode_stream(pretrained.tokenizer, load[data_name]())
    splits = data.make_lm_splits(stream, seq_len)
    model = LlamaForCausalLM(pretrained.config)
    return Task(
        data_name=data_name,
        model=model,
        params=pretrained.params,
        train={"tokens": splits.train},
        eval={"tokens": splits.val},
        loss=lm_loss,
        eval_sums=lm_sums,
        logits=lm_logits,
        sums_of=lm_sums_of,
        metric="perplexity",
        unit="tok",
        units_per_example=seq_len,
        modules_to_save=(),
        peft_task_type="CAUSAL_LM",
        tensor_parallel=TENSOR_PARALLEL["llama"],
        sample=_sampler(model, pretrained.tokenizer, splits.val[0, :PROMPT_TOKENS]),
    )


def build_task(pretrained: Pretrained, data_name: str, seq_len: int, key: jax.Array) -> Task:
    """The task for a model family and dataset.

    Args:
        pretrained: The loaded model.
        data_name: One of `DATASETS`.
        seq_len: Tokens per example.
        key: PRNG key for new heads.

    Returns:
        The task.

    Raises:
        ValueError: If the dataset does not fit the model family, or ``seq_len`` exceeds the
            model's positions.
    """
    fitting = FAMILY_DATA[pretrained.family]
    if data_name not in fitting:
        raise ValueError(
            f"--data {data_name} does not fit {pretrained.name} (a {pretrained.family} model): "
            f"{pretrained.family} models are fine-tuned on {' or '.join(fitting)}; use --data "
            f"{fitting[0]}."
        )
    limit = pretrained.config.max_position_embeddings
    if seq_len > limit:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the {limit} positions of {pretrained.name}; use "
            f"--seq-len {limit} or less."
        )
    if pretrained.family == "bert":
        return classification_task(pretrained, data_name, seq_len, key)
    return lm_task(pretrained, data_name, seq_len)
