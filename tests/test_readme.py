"""Every command and snippet the README shows runs as written: the README's commands are the product's contract.

The `step1x-export` commands run in one scratch folder, in the README's order (the flow's steps read what the
earlier ones wrote), through the CLI's entry point in this process (this checkout's code, whatever the console
script on PATH points at; torch is imported once, not per command). The server runs on a free port in place
of the README's, and the README's `curl` talks to it. The install and test commands are the ones `.ci/run` runs.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
README_PORT = "8000"

pytestmark = pytest.mark.xdist_group("readme")  # one scratch folder: the flow's commands read each other's output


def readme_commands() -> list[list[str]]:
    """Each shell command of the README's bash blocks, split as the shell would (comments dropped, lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(" && "):
                argv = shlex.split(part, comments=True)
                if argv:
                    commands.append(argv)
    return commands


def program(command: list[str]) -> str:
    """The program a command runs, past any VAR=value settings before it."""
    return next(a for a in command if "=" not in a)


def by_program(name: str) -> list[list[str]]:
    return [c for c in readme_commands() if program(c) == name]


KNOWN = {"apt-get", "pip", "python", "step1x-export", "curl"}


def test_readme_shows_only_commands_this_test_runs():
    unknown = [shlex.join(c) for c in readme_commands() if program(c) not in KNOWN]
    assert not unknown, f"README commands this test does not run (teach it, or drop them): {unknown}"


def test_readme_install_and_test_commands_are_what_ci_runs():
    """`.ci/run` installs and tests exactly as the README says (same packages, same extras, same test command)."""
    ci = [shlex.split(line, comments=True) for line in CI_RUN.read_text().replace("\\\n", " ").splitlines()]
    ci_text = "\n".join(shlex.join(c) for c in ci if c)
    user, dev = by_program("pip")  # a user's lighter install, then the developer's (what CI runs)
    assert f"python3 -m pip install -q {shlex.join(dev[2:])}" in ci_text
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^(\w+) = \[", section, flags=re.M)
    (target,) = [a for a in user[2:] if a.startswith(".[")]
    assert set(target[2:-1].split(",")) <= set(extras) and "dev" not in target, target
    (apt,) = by_program("apt-get")
    assert apt[-1] == "chromium" and "apt-get install -y -q chromium" in CI_RUN.read_text()
    for command in by_program("python"):  # the plain run, and the narrow-ISA run with its settings
        if command[1] == "-c":  # a snippet of the flow (it makes its in.png), run by the flow's test
            continue
        assert shlex.join(["python3" if a == "python" else a for a in command]) in ci_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(argv: list[str]) -> Result:
    from step1x_export.cli import main

    return CliRunner().invoke(main, argv, prog_name="step1x-export")


def wait_ready(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited: {server.stderr.read() if server.stderr else ''}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {seconds} s")


def test_readme_commands_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Demo, the whole flow (from the `in.png` it makes) and serve + curl, in the README's order, each exiting 0
    with its output written."""
    monkeypatch.chdir(tmp_path)
    port = str(free_port())
    server = None
    try:
        for argv in readme_commands():
            if argv[0] == "step1x-export" and argv[1] == "serve":
                args = [port if a == README_PORT else a for a in argv[1:]]
                server = subprocess.Popen([sys.executable, "-m", "step1x_export.cli", *args], cwd=tmp_path,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, "PYTHONPATH": str(ROOT)})
                wait_ready(f"http://127.0.0.1:{port}/readyz", server)
            elif argv[:2] == ["python", "-c"]:
                done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                                      timeout=300)
                assert done.returncode == 0, f"{shlex.join(argv)} failed: {done.stderr}"
            elif argv[0] == "step1x-export":
                done = cli(argv[1:])
                assert done.exit_code == 0, f"{shlex.join(argv)} exited {done.exit_code}:\n{done.output[-3000:]}"
            elif argv[0] == "curl":
                assert server is not None, "the README's curl comes after its serve command"
                args = [a.replace(f":{README_PORT}/", f":{port}/") for a in argv]
                done = subprocess.run([*args, "--fail", "--silent", "--show-error"], cwd=tmp_path,
                                      capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, f"{shlex.join(argv)} failed: {done.stderr}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    for written in ("in.png", "demo_edit_side_by_side.png", "out.png", "out_fp8.png", "fp8.safetensors",
                    "exports/tiny/manifest.json"):
        assert (tmp_path / written).is_file(), f"the README's commands did not write {written}"
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == Image.open(tmp_path / "in.png").size == (600, 400)  # an edit keeps the input's size


def test_readme_api_example_runs_as_written(tmp_path: Path, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README shows no Python snippet"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    assert Image.open(tmp_path / "edited.png").size == (512, 512)  # the astronaut's size
    assert "denoise" in capsys.readouterr().out  # the timing table was printed
