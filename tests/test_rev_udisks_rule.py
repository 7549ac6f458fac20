"""``polkit-rule --help`` gives commands that can be pasted as they are shown."""

from __future__ import annotations

import os
import subprocess

from conftest import popsicle_cmd

INSTALL = "popsicle-py polkit-rule | sudo tee /etc/polkit-1/rules.d/50-popsicle-py.rules"
GROUP = 'sudo groupadd --system popsicle && sudo usermod -aG popsicle "$USER"'


def test_the_install_commands_are_whole_lines_in_the_help() -> None:
    """Before, click wrapped the tee command at the terminal's width: pasted, ``tee`` got no
    file and the shell tried to run the rule's path.  And the group was not mentioned."""
    result = subprocess.run([*popsicle_cmd(), "polkit-rule", "--help"], capture_output=True,
                            text=True, check=False, env={**os.environ, "COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert INSTALL in lines, result.stdout
    assert GROUP in lines, result.stdout


def test_the_readme_installs_the_rule_as_the_help_says() -> None:
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    assert INSTALL in readme
    assert 'sudo groupadd --system popsicle && sudo usermod -aG popsicle "$USER"' in readme
