"""The public surface: documented names, and a README whose commands and quickstart work."""

import inspect
import re
import tomllib
from pathlib import Path

import jaxlora

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_public_name_is_exported_and_documented():
    assert sorted(jaxlora.__all__) == jaxlora.__all__
    for name in jaxlora.__all__:
        obj = getattr(jaxlora, name)
        assert inspect.getdoc(obj), f"jaxlora.{name} has no docstring"


def test_version_is_the_package_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", jaxlora.__version__), jaxlora.__version__
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jaxlora.__version__"}


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    commands = re.search(r"```bash\n(.*?)\n```", README, re.S).group(1).splitlines()
    assert len(commands) == 3  # the two, then the multi-task job
    assert "python experiments/multitask.py" in commands[2]
    assert commands[0].endswith("python experiments/finetune.py")
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_quickstart_runs(capsys):
    quickstart = README.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", quickstart, re.S).group(1)
    exec(compile(code, "README.md quickstart", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "trainable params" in out and "hidden" in out
    first, last = map(float, re.search(r"loss (\S+) -> (\S+)", out).groups())
    assert last < first / 2
