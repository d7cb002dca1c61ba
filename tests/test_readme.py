"""The README's embeddable-API example runs as written (tiny model, CPU)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_as_written(tmp_path: Path, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if 'Step1XEditRuntime.load("tiny"' in b)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(example, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    assert Image.open(tmp_path / "edited.png").size == (512, 512)  # the astronaut's size
    assert "denoise" in capsys.readouterr().out  # the timing table was printed
