"""Test setup: 8 fake CPU devices, set before JAX starts.

Strict dtype promotion is not switched on globally because optax's Adam bias correction
(``decay ** count``, a float against an int32) fails under it; `test_strict_promotion`
runs jaxlora's own code under ``jax.numpy_dtype_promotion("strict")`` instead.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
