"""Saves an adapter, a PEFT export and a training step, then saves them again under a file
size limit: the process the test of "File too large" runs.

    python -m tests.support.file_limit SOURCE DIR LIMIT

SOURCE is what `save_loop.prepare` wrote. Saves version 1 (`save_loop.version`) to
DIR/adapter, DIR/peft and step 1 of DIR/checkpoint; then, with files limited to LIMIT
bytes (``ulimit -f``; SIGXFSZ ignored, so a write past it fails with EFBIG instead of
killing the process), tries to save version 2 to each, and prints one JSON line per
saver: ``{"saver", "type", "errno", "message"}`` of the error it raised (or nulls).
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

import jax

import jaxlora
from tests.support import save_loop


def _savers(directory: Path, cfg, tx):
    def checkpoint(params, step):
        with jaxlora.TrainCheckpointer(directory / "checkpoint") as ckpt:
            ckpt.save(step, params, tx.init(params), jax.random.key(step))

    return {
        "save_adapter": lambda params, _: jaxlora.save_adapter(directory / "adapter", params, cfg),
        "export_peft": lambda params, _: jaxlora.export_peft(
            directory / "peft", params, cfg, module_map=jaxlora.peft_module_map()
        ),
        "TrainCheckpointer": checkpoint,
    }


def main() -> None:
    source, directory, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    cfg, lora_params = save_loop.start(source)
    savers = _savers(directory, cfg, save_loop.optimizer(lora_params))
    for save in savers.values():
        save(save_loop.version(lora_params, 1), 1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    for saver, save in savers.items():
        try:
            save(save_loop.version(lora_params, 2), 2)
            error = None
        except Exception as e:
            error = e
        print(
            json.dumps(
                {
                    "saver": saver,
                    "type": error and type(error).__name__,
                    "errno": getattr(error, "errno", None),
                    "message": error and str(error),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
