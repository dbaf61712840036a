"""The experiment scripts run as the README runs them: ``python experiments/<script> ...``."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_experiment(script: Path, *flags: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``python <script> <flags>`` from the repository root, capturing its output."""
    return subprocess.run(
        [sys.executable, str(script), *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
