"""jaxlora: LoRA fine-tuning for JAX and Flax."""

from jaxlora._config import LoraConfig
from jaxlora._linen import LoraModel
from jaxlora._lorafy import lorafy, merge, unmerge
from jaxlora._nnx import LoraLayer, LoraParam, TrainableParam
from jaxlora._summary import LayerSummary, Summary, summary
from jaxlora._train import make_train_step, optimizer
from jaxlora._tree import LoraAdapter, Trainable, combine, split, trainable_mask

__all__ = [
    "LayerSummary",
    "LoraAdapter",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LoraParam",
    "Summary",
    "Trainable",
    "TrainableParam",
    "combine",
    "lorafy",
    "make_train_step",
    "merge",
    "optimizer",
    "split",
    "summary",
    "trainable_mask",
    "unmerge",
]
