"""Fixtures shared by the test files.

``run_cli`` runs the ``ps3`` command line as a user would: ``run_cli("encode", photo, "--model", m)``
starts a real subprocess (this checkout's ``src`` first on ``PYTHONPATH``) and returns its
``subprocess.CompletedProcess`` (text ``stdout`` / ``stderr``); ``check=True`` asserts exit code 0
and shows stderr otherwise; ``run_cli.popen(...)`` starts one in the background and
``run_cli.python(...)`` runs ``python ARGS`` the same way.
``run_cli.in_process(...)`` calls :func:`ps3.cli.main` in this process (fast; output captured with
``capsys``) and returns (exit code, stdout + stderr).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def cli_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``ps3`` subprocess: this checkout's sources first, one OpenMP thread
    unless the caller's environment says otherwise."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class CliRunner:
    """What the ``run_cli`` fixture gives: call it for a subprocess, ``.in_process`` for a call."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys

    def command(self, *args, module: str = "ps3.cli") -> list[str]:
        """The argv of ``ps3 ARGS`` (``python -m MODULE ARGS``)."""
        return [sys.executable, "-m", module, *map(str, args)]

    def __call__(self, *args, check: bool = False, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 timeout: float = 300, module: str = "ps3.cli") -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(*args, module=module), capture_output=True, text=True, cwd=cwd,
                              timeout=timeout, env=cli_environment(env))
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def python(self, *args, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
        """``python ARGS`` (e.g. ``-c CODE``) in a subprocess with the environment of a ``ps3`` one."""
        proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env=cli_environment())
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def popen(self, *args, module: str = "ps3.cli", env: dict[str, str] | None = None,
              **kwargs) -> subprocess.Popen:
        """``ps3 ARGS`` started in the background (stdout and stderr piped, text)."""
        return subprocess.Popen(self.command(*args, module=module), env=cli_environment(env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)

    def in_process(self, *args) -> tuple[int, str]:
        from ps3.cli import main

        self._capsys.readouterr()  # only this call's output
        try:
            code = main([*map(str, args)])
        except SystemExit as exc:  # argparse: --help, --version, a bad flag
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        captured = self._capsys.readouterr()
        return code, captured.out + captured.err


@pytest.fixture
def run_cli(capsys) -> CliRunner:
    """Run the ``ps3`` command line (see the module docstring)."""
    return CliRunner(capsys)
