"""jaxlora: LoRA fine-tuning for JAX and Flax."""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

from jaxlora._adapter_files import load_adapter, save_adapter
from jaxlora._bank import AdapterBank, BankModel
from jaxlora._bank_files import load_bank, save_bank
from jaxlora._bank_nnx import LoraBank
from jaxlora._combine import add_weighted_adapter
from jaxlora._config import LoraConfig
from jaxlora._convert import convert_to_lora
from jaxlora._distributed import initialize_distributed, parse_mesh, shard_batch
from jaxlora._linen import LoraModel
from jaxlora._lorafy import lorafy, merge, unmerge
from jaxlora._nnx import LoraLayer, LoraModule, LoraParam, TrainableParam, WeightAdapter
from jaxlora._peft import export_peft
from jaxlora._peft_import import import_peft
from jaxlora._peft_names import peft_module_map, peft_module_maps
from jaxlora._placement import adapter_partition_specs, shard_params
from jaxlora._quantize import QuantizedArray, dequantize, from_gguf, quantize
from jaxlora._summary import LayerSummary, Summary, summary
from jaxlora._tokens import TrainableTokens
from jaxlora._train import make_train_step, optimizer
from jaxlora._train_checkpoint import ResumeState, TrainCheckpointer
from jaxlora._tree import LoraAdapter, Trainable, combine, split, trainable_mask

__all__ = [
    "AdapterBank",
    "BankModel",
    "LayerSummary",
    "LoraAdapter",
    "LoraBank",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LoraModule",
    "LoraParam",
    "QuantizedArray",
    "ResumeState",
    "Summary",
    "TrainCheckpointer",
    "Trainable",
    "TrainableParam",
    "TrainableTokens",
    "WeightAdapter",
    "adapter_partition_specs",
    "add_weighted_adapter",
    "combine",
    "convert_to_lora",
    "dequantize",
    "export_peft",
    "from_gguf",
    "import_peft",
    "initialize_distributed",
    "load_adapter",
    "load_bank",
    "lorafy",
    "make_train_step",
    "merge",
    "optimizer",
    "parse_mesh",
    "peft_module_map",
    "peft_module_maps",
    "quantize",
    "save_adapter",
    "save_bank",
    "shard_batch",
    "shard_params",
    "split",
    "summary",
    "trainable_mask",
    "unmerge",
]
