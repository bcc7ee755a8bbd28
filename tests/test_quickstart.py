"""The README's "Install and quick start" section, command after command, in a scratch directory.

Each ```bash line runs in order, with three stand-ins so the test takes seconds:
* ``make demo`` (a venv, an install, minutes of training) is replaced by a copy of the tiny
  fixture model (tests/fixtures/ps3_tiny/model) to ``runs/demo/model``, where the demo exports;
  ``tests/test_demo.py`` runs the demo pipeline itself;
* ``source .venv/bin/activate`` is skipped: this interpreter is the environment;
* ``ps3 ARGS`` (or ``.venv/bin/ps3 ARGS``) calls ``ps3.cli.main`` in this process; any other
  command (``python -c ...``) runs in a subprocess with this checkout's sources.
Every command must exit 0, and the figures the page states must be what the commands print.
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

pytest.importorskip("webdataset")

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "README.md"
SECTION = "## Install and quick start"
FIXTURE_MODEL = ROOT / "tests" / "fixtures" / "ps3_tiny" / "model"

# What a command's output must contain (command prefix → texts): the figures the page states.
EXPECTED = {
    "ps3 --help": ["encode", "init", "train", "export"],
    "ps3 init random-4k": ["low-res 729; one look 729 + 2,560 = 3,289; all 729 + 87,480 = 88,209"],
    "ps3 encode docs/dock.jpg --model runs/random-4k --looks 1": ["[85, 341, 2134]"],
    "python -c": ["TokenCount(low_res=729, per_scale=[2916, 11664, 72900]"],
    "ps3 export runs/pretrain": ["(step 20)"],
}


def commands(page: Path) -> list[str]:
    """The lines of the quick-start section's ```bash blocks, in order (comments and blank lines
    dropped)."""
    text = page.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words))
    return lines


def run(command: str, run_cli) -> str:
    """Run one quick-start command in the current directory; its output."""
    words = shlex.split(command)
    if words[:2] == ["make", "demo"]:
        shutil.copytree(FIXTURE_MODEL, Path("runs/demo/model"))
        return ""
    if words[0] == "source":
        return ""
    if words[0] in ("ps3", ".venv/bin/ps3"):
        code, output = run_cli.in_process(*words[1:])
        assert code == 0, f"{command}\n{output}"
        return output
    if words[0] == "python":
        done = run_cli.python(*words[1:])
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        return done.stdout + done.stderr
    raise AssertionError(f"the quick start runs {command!r}, which this test does not know how to run")


@pytest.mark.slow
def test_quickstart_runs_command_after_command(tmp_path, monkeypatch, run_cli):
    listed = commands(PAGE)
    assert listed[:3] == ["make demo", "source .venv/bin/activate", "ps3 --help"]
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "dock.jpg", tmp_path / "docs" / "dock.jpg")
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for command in listed:
        outputs[command] = output = run(command, run_cli)
        for prefix, texts in EXPECTED.items():
            if command.startswith(prefix):
                missing = [t for t in texts if t not in output]
                assert not missing, f"{command} printed no {missing}:\n{output}"
    trains = [c for c in listed if c.startswith("ps3 train")]
    assert len(trains) == 2 and "resumed from" in outputs[trains[1]] and "at step 10 " in outputs[trains[1]]
    assert sorted(p.name for p in Path("runs/pretrain/checkpoints").glob("*.pt"))[-1] == "step_00000020.pt"
    assert (tmp_path / "runs" / "viz").is_dir() and (tmp_path / "runs" / "dock.safetensors").is_file()
