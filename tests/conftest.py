"""Test setup: 8 fake CPU devices, set before JAX starts.

Strict dtype promotion is not switched on globally because optax's Adam bias correction
(``decay ** count``, a float against an int32) fails under it; `test_strict_promotion`
runs jaxlora's own code under ``jax.numpy_dtype_promotion("strict")`` instead.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()


@pytest.fixture(scope="module")
def torch_base():
    """The PEFT tests' torch model (`peft_models.TorchNet`, seed 0)."""
    # imported here so that tests without torch do not pay for importing it
    import torch

    from tests.support import peft_models

    torch.manual_seed(0)
    return peft_models.TorchNet().eval()


@pytest.fixture(scope="module")
def base_params(torch_base):
    """`torch_base`'s weights as `peft_models.Net` params."""
    from tests.support import peft_models

    return peft_models.flax_params(torch_base)
