"""Ctrl-C in the first tenth of a second, while the command's modules are imported: one line
and 130, as a Ctrl-C before the run says it, not Python's traceback.

The SIGINT is real and comes at a set point: a ``sitecustomize`` put first on PYTHONPATH
sends it to the process as the named module starts to import.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import popsicle_cmd

HOOK = '''
import os, signal, sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["POPSICLE_TEST_INTERRUPT_AT"]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
'''


@pytest.mark.parametrize("module", ["click", "popsicle_py.cli.commands", "popsicle_py.app.flash"])
def test_ctrl_c_while_the_command_starts_is_one_line_and_130(module: str,
                                                            tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    image = tmp_path / "image.img"
    image.write_bytes(bytes(1 << 20))
    env = {**os.environ, "POPSICLE_TEST_INTERRUPT_AT": module,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]])}
    proc = subprocess.run([*popsicle_cmd(), "flash", "--yes", str(image), "/dev/null"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.stderr == "popsicle-py: interrupted before writing: nothing was written\n"
    assert proc.returncode == 130 and proc.stdout == ""
