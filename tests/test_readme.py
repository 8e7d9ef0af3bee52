"""The README's quick start runs as pasted and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import gmp_ext

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_quick_start_runs_as_pasted_and_prunes_exactly(capsys):
    if not README.is_file():
        pytest.skip("README.md is not beside the tests (an installed copy of the tests)")
    namespace: dict[str, object] = {}
    exec(compile(python_blocks("Quick start")[0], "README quick start", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
    for name, weight in [("0.weight", model[0].weight), ("2.weight", model[2].weight)]:
        assert int((weight == 0).sum()) == round(0.9 * weight.numel()), name
    assert "total" in capsys.readouterr().out  # the report was printed
    gmp_ext.remove(model)
