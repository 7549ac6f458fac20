"""Settings values that were taken and then did not work on the board: each is refused in
one line before anything is written (or written so the board reads what was meant)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from popsicle_py.settings import DriveContext, SettingsError, load_settings
from popsicle_py.settings.values import resolve

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK7y7UxIbBf10hjkkKaoDhFxSFdfZG1ZjTmXCUdxf9Rz "
       "teacher@lab")


def _resolved(tmp_path: Path, text: str) -> None:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    resolve(load_settings(str(path)), None, DriveContext(1, 1))


def _keygen_refuses(key: str) -> bool:
    return subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=key, capture_output=True,
                          text=True).returncode != 0


@pytest.mark.parametrize("key", [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 a@x",  # the type's name alone
    KEY.split()[0] + " " + KEY.split()[1][:48],  # a paste cut at a multiple of 4 characters
    KEY.split()[0] + " " + KEY.split()[1][:64],
])
def test_a_key_cut_short_is_refused(tmp_path: Path, key: str) -> None:
    """Base64 that still decodes, of a key cut short: it was written into authorized_keys,
    the drive was ok, and no one could log in with it."""
    assert _keygen_refuses(key)
    with pytest.raises(SettingsError) as info:
        _resolved(tmp_path, f'user = "u"\nssh_authorized_keys = ["{key}"]\n')
    assert "malformed SSH key" in str(info.value) and "cut short?" in str(info.value)


def test_a_whole_key_is_taken(tmp_path: Path) -> None:
    assert not _keygen_refuses(KEY)
    _resolved(tmp_path, f'user = "u"\nssh_authorized_keys = ["{KEY}"]\n')


@pytest.mark.parametrize("ssid", ["-010", "-1", "-0x1f", "-1_000", "-0", "-", "-a", "_1"])
def test_an_ssid_with_a_sign_stays_that_string(ssid: str) -> None:
    """Written as a plain key, YAML 1.1 (cloud-init reads network-config with PyYAML) read
    "-010" as the number -8: the board was told to join "-8"."""
    import json

    from popsicle_py.settings.cloudinit import network_config
    from popsicle_py.settings.model import Settings, Wifi

    text = network_config(Settings(wifi=Wifi(ssid, "", "DE"))) or ""
    loaded = subprocess.run(["/usr/bin/python3", "-c", "import json, sys, yaml; "
                             "print(json.dumps(yaml.safe_load(sys.stdin)))"], input=text,
                            capture_output=True, text=True, check=True).stdout
    points = json.loads(loaded)["network"]["wifis"]["wlan0"]["access-points"]
    assert list(points) == [ssid]


def test_an_empty_password_is_refused(tmp_path: Path) -> None:
    """A row whose password cell is empty: the user got the hash of "" with lock_passwd
    false and sudo without a password, and the drive was ok."""
    from popsicle_py.settings import parse_values

    path = tmp_path / "settings.toml"
    path.write_text('hostname = "{hostname}"\nuser = "student"\npassword = "{pw}"\n')
    values = parse_values("seq,hostname,pw\n1,pi-01,\n", "class.csv")
    with pytest.raises(SettingsError) as info:
        resolve(load_settings(str(path)), values, DriveContext(1, 1))
    assert str(info.value).startswith("drive 1: password is empty: user 'student' would log in")


@pytest.mark.parametrize("passphrase", ["ééééé", "é" * 31, "é" * 32, "é" * 40, "abcdefgh"])
def test_a_wifi_passphrase_is_taken_as_wpa_supplicant_takes_it(tmp_path: Path,
                                                                passphrase: str) -> None:
    """Its length is counted in bytes, as wpa_supplicant counts it (8 to 63): "ééééé" (10
    bytes) was refused as 5 characters; 40 "é" (80 bytes, which no access point takes) was
    written.  The PSK is wpa_passphrase's: PBKDF2-HMAC-SHA1 over the SSID, 4096 rounds."""
    from popsicle_py.settings.cloudinit import wpa_psk
    from popsicle_py.settings.model import Wifi

    text = f'[wifi]\nssid = "lab"\npassphrase = "{passphrase}"\ncountry = "DE"\n'
    if 8 <= len(passphrase.encode()) <= 63:
        _resolved(tmp_path, text)
        expected = hashlib.pbkdf2_hmac("sha1", passphrase.encode(), b"lab", 4096, 32).hex()
        assert wpa_psk(Wifi("lab", passphrase, "DE")) == expected
    else:
        with pytest.raises(SettingsError) as info:
            _resolved(tmp_path, text)
        assert "wifi.passphrase must be 8 to 63 bytes" in str(info.value)


@pytest.mark.parametrize(("cell", "refused"), [('"correct horse "', True), ('" pw-12345"', True),
                                               ("pw-12345", False)])
def test_a_secret_from_a_cell_with_spaces_at_its_ends_is_refused(
        tmp_path: Path, cell: str, refused: bool) -> None:
    """Every cell is stripped: a password (or Wi-Fi passphrase) "correct horse " became
    "correct horse", hashed and written, and the drive was ok."""
    from popsicle_py.settings import parse_values

    path = tmp_path / "settings.toml"
    path.write_text('user = "student"\npassword = "{pw}"\n'
                    '[wifi]\nssid = "lab"\npassphrase = "{pw}"\ncountry = "DE"\n')
    values = parse_values(f"seq,pw\n1,{cell}\n", "class.csv")
    if not refused:
        resolve(load_settings(str(path)), values, DriveContext(1, 1))
        return
    with pytest.raises(SettingsError) as info:
        resolve(load_settings(str(path)), values, DriveContext(1, 1))
    assert str(info.value).startswith("drive 1: password comes from the column 'pw' of "
                                      "class.csv, whose cell has spaces at its start or end")


def test_an_empty_passphrase_cell_is_refused(tmp_path: Path) -> None:
    """A row without its Wi-Fi passphrase was written as an open network: the board never
    joined the class's WPA network, and the drive was ok."""
    from popsicle_py.settings import parse_values
    from popsicle_py.settings.cloudinit import network_config

    path = tmp_path / "settings.toml"
    path.write_text('[wifi]\nssid = "lab"\npassphrase = "{wifi}"\ncountry = "DE"\n')
    values = parse_values("seq,wifi\n1,\n2,correct horse\n", "class.csv")
    settings = load_settings(str(path))
    with pytest.raises(SettingsError) as info:
        resolve(settings, values, DriveContext(1, 1))
    assert str(info.value).startswith("drive 1: wifi.passphrase '{wifi}' is empty for this "
                                      "drive (an empty cell)")
    assert "password" in (network_config(resolve(settings, values, DriveContext(2, 2))) or "")
    path.write_text('[wifi]\nssid = "lab"\npassphrase = ""\ncountry = "DE"\n')  # open: said so
    resolve(load_settings(str(path)), values, DriveContext(1, 1))


@pytest.mark.parametrize("locale", ["C.UTF-8", "C", "POSIX", "en_GB.UTF-8", "sr_RS@latin"])
def test_the_c_locale_is_a_locale(tmp_path: Path, locale: str) -> None:
    """"locale 'C.UTF-8' is not a locale" was said of Debian's own default."""
    _resolved(tmp_path, f'locale = "{locale}"\n')
