"""LoraConfig validation and target matching."""

import math

import pytest

import jaxlora
from jaxlora._config import path_matches


@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("encoder/layer_0/attention/self/query", "query", True),
        ("encoder/layer_0/attention/self/query", "*/query", True),
        ("encoder/layer_0/attention/self/query", "encoder/*/query", True),
        ("encoder/layer_0/attention/self/query", "key", False),
        ("encoder/layer_0/attention/self/query", "re:.*layer_[0-3]/.*/query", True),
        ("encoder/layer_7/attention/self/query", "re:.*layer_[0-3]/.*/query", False),
        ("query", "*/query", False),
        ("mlp/up_proj", "*_proj", True),
    ],
)
def test_path_matches(path, pattern, expected):
    assert path_matches(path, pattern) is expected


def test_selects_all_linear_exclude_and_embeddings():
    cfg = jaxlora.LoraConfig(targets="all-linear", exclude=["head"])
    assert cfg.selects("block/up", is_linear=True)
    assert not cfg.selects("head", is_linear=True)
    assert not cfg.selects("embed", is_linear=False)
    both = jaxlora.LoraConfig(targets=["all-linear", "embed"])
    assert both.selects("embed", is_linear=False)


def test_rank_alpha_patterns_and_scale():
    cfg = jaxlora.LoraConfig(
        rank=8, alpha=16, rank_pattern={"*/value": 4}, alpha_pattern={"re:.*query": 4.0}
    )
    assert cfg.rank_for("a/value") == 4
    assert cfg.rank_for("a/query") == 8
    assert cfg.alpha_for("a/query") == 4.0
    assert cfg.alpha_for("a/value") == 16
    assert cfg.scale_for("a/value") == 16 / 4
    assert cfg.scale_for("a/query") == 4.0 / 8
    rs = jaxlora.LoraConfig(rank=16, alpha=8, rslora=True)
    assert rs.scale_for("x") == pytest.approx(8 / math.sqrt(16))


def test_to_dict_round_trip():
    cfg = jaxlora.LoraConfig(rank=4, targets=["q", "v"], rank_pattern={"v": 2}, dtype="bfloat16")
    assert jaxlora.LoraConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"rank=0 must be a positive int"),
        ({"rank": -3}, r"rank=-3"),
        ({"rank": 2.5}, r"rank=2.5"),
        ({"alpha": 0}, r"alpha=0 must be a finite positive number"),
        ({"dropout": 1.0}, r"dropout=1.0 is outside \[0, 1\)"),
        ({"dropout": -0.1}, r"outside \[0, 1\)"),
        ({"init": "xavier"}, r"unknown init='xavier'"),
        ({"bias": "some"}, r"unknown bias='some'"),
        ({"targets": []}, r"targets is empty"),
        ({"targets": ["re:(("]}, r"bad regex"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]=0"),
        ({"init": "pissa", "quantize": "nf4"}, r"init='pissa' with quantize='nf4' is not"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxlora.LoraConfig(**kwargs)
