"""A password (or Wi-Fi passphrase) holding a brace is a template to the loader: its refusal
showed the password in clear text, or the piece of it between the braces (one line, exit 2,
nothing written, and now never the secret); ``{{`` and ``}}`` are a literal brace, as the README
says.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop
from test_customize import FILL, popsicle

from popsicle_py.settings import DriveContext, load_settings, resolve

pytestmark = pytest.mark.root
SECRET = "Hunter2Secret"


def flash(tmp_path: Path, loop_factory: Callable[..., Loop], settings: bytes,
          ) -> tuple[int, str, Loop]:
    image = pi_image.build(tmp_path, table="mbr")
    toml = tmp_path / "settings.toml"
    toml.write_bytes(settings)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml)
    return done.returncode, done.stderr + done.stdout, loop


def nothing_written(loop: Loop) -> bool:
    return Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


@pytest.mark.parametrize("settings", [
    f'user = "pi"\npassword = "My{{{SECRET}}}pass"\n',  # a field naming no column
    f'user = "pi"\npassword = "My}}{SECRET}"\n',  # a single brace
    f'user = "pi"\npassword = "pw{{{SECRET}!r}}"\n',  # not a plain name
    f'user = "pi"\npassword = "p"\n[wifi]\nssid = "x"\ncountry = "DE"\n'
    f'passphrase = "{SECRET}{{0}}"\n',
], ids=["field", "single brace", "conversion", "passphrase"])
def test_a_secret_holding_a_brace_is_refused_without_showing_it(
        tmp_path: Path, loop_factory: Callable[..., Loop], settings: str) -> None:
    code, said, loop = flash(tmp_path, loop_factory, settings.encode())
    assert code == 2, said
    line = said.strip()
    assert "\n" not in line and SECRET not in line, line
    assert "a literal { or } is written {{ or }}" in line and "settings.toml" in line, line
    assert nothing_written(loop)


def test_a_doubled_brace_in_a_password_is_one_brace(tmp_path: Path) -> None:
    """As the README says: ``{{`` and ``}}`` are a literal brace."""
    toml = tmp_path / "settings.toml"
    toml.write_text('user = "pi"\npassword = "a{{b}}c"\n')
    assert resolve(load_settings(str(toml)), None, DriveContext(1, 1)).password == "a{b}c"
