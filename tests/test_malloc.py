"""diffusion_np.malloc: glibc's malloc set for training, by the command and the benchmarks, never by an import."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_np import cli


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_every_setting_takes_in_a_fresh_process():
    """In a subprocess, as the settings are for a whole process (this one keeps its own)."""
    code = "from diffusion_np.malloc import tune_malloc; print(tune_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_the_command_tunes_once_and_no_library_module_does(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append(1) or True)
    missing = str(tmp_path / "missing")
    assert cli.main(["export", "--checkpoint", missing, "--out", str(tmp_path / "out")]) == 2  # a usage error
    assert calls == [1]
    package = Path(cli.__file__).parent
    callers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                     if "tune_malloc(" in p.read_text() and p.name != "malloc.py")
    assert callers == ["cli.py"]  # an import of the library leaves the process's malloc as it was
