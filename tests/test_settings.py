"""Per-drive settings, the pure parts: the file, the templates, the CSV and the files made."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from popsicle_py.settings import DriveContext, SettingsError, load_settings, parse_values
from popsicle_py.settings.cloudinit import cloud_init_files, wpa_psk
from popsicle_py.settings.firstrun import (
    HOOK,
    cmdline_with_hook,
    firstrun_files,
    firstrun_script,
)
from popsicle_py.settings.model import Settings, Wifi, check_key, redacted
from popsicle_py.settings.sha512crypt import sha512_crypt
from popsicle_py.settings.values import check_templates, resolve, resolve_all

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK7y7UxIbBf10hjkkKaoDhFxSFdfZG1ZjTmXCUdxf9Rz "
       "teacher@lab")
SETTINGS = """\
hostname = "pi-{seq:02}"
user = "station"
password = "correct horse battery"
ssh_authorized_keys = ["{ssh_key}"]
timezone = "Europe/Berlin"
keyboard = "de"
locale = "de_DE.UTF-8"
[wifi]
ssid = "classroom"
passphrase = "very secret words"
country = "de"
"""


def settings_file(tmp_path: Path, text: str = SETTINGS) -> str:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return str(path)


def drives(n: int) -> list[DriveContext]:
    return [DriveContext(i, i, f"SER{i}", f"1-{i}") for i in range(1, n + 1)]


@pytest.mark.parametrize("password,salt", [
    ("correct horse battery", "abcdefgh12345678"), ("p", "x"), ("ä€ unicode", "saltsalt"),
    ("a" * 100, "saltsaltsaltsaltEXTRA")])
def test_sha512_crypt_matches_openssl(password: str, salt: str) -> None:
    expected = subprocess.run(["openssl", "passwd", "-6", "-salt", salt[:16], "-stdin"],
                              input=password, capture_output=True, text=True, check=True)
    assert sha512_crypt(password, salt) == expected.stdout.strip()


def test_templates_fill_seq_and_columns(tmp_path: Path) -> None:
    settings = load_settings(settings_file(tmp_path))
    values = parse_values(f"serial,ssh_key\nSER2,{KEY}\nSER1,{KEY}\n", "v.csv")
    check_templates(settings, values, "settings.toml")
    one, two = resolve_all(settings, values, drives(2))
    assert (one.hostname, two.hostname) == ("pi-01", "pi-02")
    assert one.ssh_authorized_keys == (KEY,)
    assert one.wifi == Wifi("classroom", "very secret words", "DE")


@pytest.mark.parametrize("text,csv,message", [
    ('hostnam = "x"\n', None, "unknown setting 'hostnam'"),
    ('[wifi]\nssid = "a"\npassphrase = "12345678"\ncountry = "XX"\n', None,
     "'XX' is not an ISO 3166"),
    ('user = "u"\nssh_authorized_keys = ["ssh-ed25519 AAAAnotakey"]\n', None,
     "malformed SSH key"),
    ('user = "u"\nssh_authorized_keys = ["ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIK7y7UxIbBf10hjkkKaoD'
     'hFxSFdfZG1ZjTmXCUdxf9Rz"]\n', None, "says ssh-rsa but holds ssh-ed25519"),
    ('hostname = "{name}"\n', "seq,hostname\n1,a\n", "uses {name}, which names no column"),
    ('hostname = "{hostname}"\n', None, "no --values file is given"),
    ('hostname = "{hostname}"\n', "seq,hostname\n1,a\n", "has no row for drive 2"),
    ('hostname = "{hostname}"\n', "hostname\na\n", "has 1 rows for 2 drives"),
    ('hostname = "{hostname}"\n', "seq,hostname\n1,a\n2,A\n", "hostname 'A' would be given"),
    ('hostname = "pi"\n', None, "hostname 'pi' would be given to two drives"),
    ('hostname = "{hostname}"\n', "seq,hostname\n1,a\n2,b_c\n", "not a valid host name"),
    ('timezone = "Mars/Olympus"\n', None, "unknown timezone"),
    ('password = "x"\n', None, "a password needs a user"),
    # One line of text each: no control character, no line break.
    (f'user = "u"\nssh_authorized_keys = ["{KEY}\\nssh-rsa AAAA junk"]\n', None,
     "ssh_authorized_keys holds a control character or line break (U+000A)"),
    (f'user = "u"\nssh_authorized_keys = ["{KEY}\\u0090"]\n', None, "(U+0090)"),
    (f'user = "u"\nssh_authorized_keys = ["{KEY}\\u2029x"]\n', None, "(U+2029)"),
    ('user = "u"\nssh_authorized_keys = ["{k}"]\n', f"seq,k\n1,{KEY}\x7f\n2,{KEY}\n",
     "SER1): ssh_authorized_keys holds a control character or line break (U+007F)"),
    ('[wifi]\nssid = "a\\u0085b"\ncountry = "DE"\n', None,
     "wifi.ssid holds a control character or line break (U+0085)"),
    ('[wifi]\nssid = "ab"\npassphrase = "tab\\there12"\ncountry = "DE"\n', None,
     "wifi.passphrase holds a control character or line break (U+0009)"),
    ('user = "u"\npassword = "a\\rb"\n', None, "password holds a control character"),
    ('hostname = "a\\u001bb"\n', None, "hostname holds a control character"),
    # crypt() refuses 512 bytes or more.
    ('user = "u"\npassword = "' + "€" * 171 + '"\n', None, "password is 513 bytes; at most 511"),
    # SSH on with no way in, in either format.
    ('user = "u"\npassword = "pw"\nssh = true\n', None,
     "ssh = true without ssh_authorized_keys needs ssh_password_auth = true"),
    ('user = "u"\nssh = true\nssh_authorized_keys = ["{k}"]\n', f"seq,k\n1,{KEY}\n2,\n",
     "SER2): ssh = true without ssh_authorized_keys"),
    ('user = "u"\nssh = false\nssh_authorized_keys = ["{k}"]\n', f"seq,k\n1,{KEY}\n2,{KEY}\n",
     "SER1): ssh = false with ssh_authorized_keys"),
    # Names FAT cannot hold as given.
    ('[files]\n"." = "w.txt"\n', None, "[files] '.': not a file name"),
    ('[files]\n"..." = "w.txt"\n', None, "[files] '...': not a file name"),
    ('[files]\n"notes." = "w.txt"\n', None, "[files] 'notes.': not a file name"),
    ('[files]\n"aux" = "w.txt"\n', None, "[files] 'aux': AUX is a DOS device name"),
    ('[files]\n"Com1.tar.gz" = "w.txt"\n', None, "COM1 is a DOS device name"),
    ('[files]\n"nul.txt" = "w.txt"\n', None, "NUL is a DOS device name"),
    ('[files]\n"README" = "w.txt"\n"readme" = "w.txt"\n', None,
     "[files] 'readme': the same name as README (FAT ignores case)"),
    ('[files]\n"User-Data" = "w.txt"\n', None, "popsicle-py writes user-data"),
])
def test_bad_input_is_one_line(tmp_path: Path, text: str, csv: str | None,
                               message: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings = load_settings(settings_file(tmp_path, text))
        values = parse_values(csv, "v.csv") if csv is not None else None
        check_templates(settings, values, "settings.toml")
        resolve_all(settings, values, drives(2))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_what_fat_and_crypt_take_is_taken(tmp_path: Path) -> None:
    (tmp_path / "w.txt").write_text("welcome\n")
    text = ('user = "u"\npassword = "' + "€" * 170 + '"\n[files]\n".hidden" = "w.txt"\n'
            '"a.b.c" = "w.txt"\n"CONFIG.TXT" = "w.txt"\n"com10" = "w.txt"\n"lpt" = "w.txt"\n')
    settings = load_settings(settings_file(tmp_path, text))
    one = resolve(settings, None, drives(1)[0])
    assert len((one.password or "").encode()) == 510
    assert [name for name, _ in one.files] == [".hidden", "CONFIG.TXT", "a.b.c", "com10", "lpt"]


def test_a_settings_file_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_bytes(b'hostname = "pi"\nuser = "j\xf6rg"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(str(path))
    assert str(info.value) == f"{path}: not UTF-8 text (line 2)"


def test_firstrun_refuses_a_user_without_a_password(tmp_path: Path) -> None:
    """firstrun renames the image's first user and sets its password: without one the user
    was dropped.  cloud-init makes it locked."""
    from popsicle_py.settings.model import check_format

    settings = load_settings(settings_file(tmp_path, f'user = "u"\nssh_authorized_keys = '
                                                     f'["{KEY}"]\n'))
    check_format(settings, "cloud-init", "s.toml")
    with pytest.raises(SettingsError) as info:
        check_format(settings, "firstrun", "s.toml")
    assert str(info.value).startswith("s.toml: the firstrun format needs a password or "
                                      "password_hash for user 'u' (")
    one = resolve(settings, None, drives(1)[0])
    assert b"lock_passwd: true" in cloud_init_files(one, "iid")["user-data"]


@pytest.mark.parametrize("keys,pwauth", [(True, False), (True, True), (False, True)])
def test_both_formats_set_password_authentication_alike(tmp_path: Path, keys: bool,
                                                        pwauth: bool) -> None:
    """cloud-init's ssh_pwauth, the helper's -k (key only; without it the image's sshd
    default, yes) and the fallback's sshd_config line all say ssh_password_auth."""
    text = ('user = "u"\npassword = "pw"\nssh = true\n'
            f'ssh_password_auth = {str(pwauth).lower()}\n'
            + (f'ssh_authorized_keys = ["{KEY}"]\n' if keys else ""))
    one = resolve(load_settings(settings_file(tmp_path, text)), None, drives(1)[0])
    user_data = cloud_init_files(one, "iid")["user-data"].decode()
    assert f"ssh_pwauth: {str(pwauth).lower()}" in user_data.splitlines()
    script = firstrun_files(one, b"console=tty1\n")["firstrun.sh"].decode().splitlines()
    (helper,) = [line.split() for line in script if "enable_ssh" in line]
    assert ("-k" in helper) is not pwauth and ("-p" not in helper)
    assert f"   echo 'PasswordAuthentication {'yes' if pwauth else 'no'}' >>/etc/ssh/sshd_" \
        "config" in script


def test_check_key_accepts_real_keys(tmp_path: Path) -> None:
    for kind in ("ed25519", "rsa", "ecdsa"):
        key = tmp_path / kind
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)], check=True)
        check_key(key.with_suffix(".pub").read_text().strip())


def _one(tmp_path: Path) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, object]]:
    settings = load_settings(settings_file(tmp_path))
    values = parse_values(f"seq,ssh_key\n1,{KEY}\n", "v.csv")
    one = resolve(settings, values, drives(1)[0])
    return (cloud_init_files(one, "iid-test"), firstrun_files(one, b"console=tty1 rootwait\n"),
            redacted(one))


def test_no_secret_in_clear_text(tmp_path: Path) -> None:
    cloud, firstrun, record = _one(tmp_path)
    for data in [*cloud.values(), *firstrun.values(), repr(record).encode()]:
        assert b"correct horse" not in data
        assert b"very secret" not in data
    assert b"$6$" in cloud["user-data"] and b"$6$" in firstrun["firstrun.sh"]
    psk = wpa_psk(Wifi("classroom", "very secret words", "DE")).encode()
    assert psk in cloud["network-config"] and psk in firstrun["firstrun.sh"]
    assert record["password"] == "<redacted>"
    settings = load_settings(settings_file(tmp_path))
    assert "correct horse" not in repr(settings) and "very secret" not in repr(settings)


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="cloud-init is not installed")
def test_user_data_passes_cloud_inits_schema(tmp_path: Path) -> None:
    cloud, _, _ = _one(tmp_path)
    path = tmp_path / "user-data"
    path.write_bytes(cloud["user-data"])
    done = subprocess.run(["cloud-init", "schema", "--config-file", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_firstrun_script_is_clean_shell(tmp_path: Path) -> None:
    _, firstrun, _ = _one(tmp_path)
    script = tmp_path / "firstrun.sh"
    script.write_bytes(firstrun["firstrun.sh"])
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert firstrun["cmdline.txt"] == b"console=tty1 rootwait" + HOOK.encode() + b"\n"


def test_hook_is_not_repeated() -> None:
    once = cmdline_with_hook(b"console=tty1 rootwait\n")
    assert cmdline_with_hook(once) == once


def test_an_earlier_hook_is_replaced_and_what_follows_it_stays_after_first_boot(
        tmp_path: Path) -> None:
    """An image customised before (Imager's hook in the middle of the line): everything after
    ``systemd.run=`` was dropped, ``quiet splash`` and the root's options with it."""
    image = (b"console=serial0,115200 root=PARTUUID=1-02 systemd.run=/boot/firstrun.sh "
             b"systemd.run_success_action=reboot systemd.unit=kernel-command-line.target "
             b"rootfstype=ext4 fsck.repair=yes rootwait quiet splash\n")
    cmdline = tmp_path / "cmdline.txt"
    cmdline.write_bytes(cmdline_with_hook(image))
    assert cmdline.read_bytes().count(b"systemd.run=") == 1
    sed = re.search(r"sed -i '(.*?)' ", firstrun_script(Settings(hostname="pi"), None))
    assert sed is not None
    subprocess.run(["sed", "-i", sed[1], str(cmdline)], check=True)  # the first boot's
    assert cmdline.read_bytes() == (b"console=serial0,115200 root=PARTUUID=1-02 "
                                    b"rootfstype=ext4 fsck.repair=yes rootwait quiet splash\n")


@pytest.mark.parametrize("ssid", ["on", "No", "123", "a: b", "classroom"])
def test_an_ssid_stays_a_string(ssid: str) -> None:
    from popsicle_py.settings.cloudinit import network_config
    from popsicle_py.settings.model import Settings

    text = network_config(Settings(wifi=Wifi(ssid, "", "DE"))) or ""
    loaded = subprocess.run(["/usr/bin/python3", "-c", "import json, sys, yaml; "
                             "print(json.dumps(yaml.safe_load(sys.stdin)))"], input=text,
                            capture_output=True, text=True, check=True).stdout
    points = json.loads(loaded)["network"]["wifis"]["wlan0"]["access-points"]
    assert list(points) == [ssid]


VARIANTS = {
    "minimal": 'hostname = "pi-{seq}"\n',
    "user-no-keys": 'user = "u"\npassword = "pw"\nssh = true\nssh_password_auth = true\n',
    "ssh-off": ('user = "u"\npassword_hash = "' + sha512_crypt("pw", "saltsalt")
                + '"\nssh = false\n'),
    "open-hidden-wifi": '[wifi]\nssid = "on"\ncountry = "GB"\nhidden = true\n',
    "hex-psk": '[wifi]\nssid = "lab"\npassphrase = "' + "ab" * 32 + '"\ncountry = "US"\n',
    "locale-only": 'locale = "en_GB.UTF-8"\nkeyboard = "gb"\ntimezone = "Europe/London"\n',
    "not-ascii": (f'user = "u"\npassword = "pw"\nssh_authorized_keys = ["{KEY}-José ☕"]\n'
                  '[wifi]\nssid = "Café"\ncountry = "FR"\n'),
}


@pytest.mark.skipif(shutil.which("shellcheck") is None or shutil.which("cloud-init") is None,
                    reason="shellcheck or cloud-init is not installed")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_is_valid_for_cloud_init_and_shellcheck(tmp_path: Path,
                                                              variant: str) -> None:
    settings = load_settings(settings_file(tmp_path, VARIANTS[variant]))
    one = resolve(settings, None, drives(1)[0])
    user_data = tmp_path / "user-data"
    user_data.write_bytes(cloud_init_files(one, "iid")["user-data"])
    done = subprocess.run(["cloud-init", "schema", "--config-file", str(user_data)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    script = tmp_path / "firstrun.sh"
    script.write_bytes(firstrun_files(one, b"console=tty1\n")["firstrun.sh"])
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_a_station_slot_label_picks_its_row(tmp_path: Path) -> None:
    settings = load_settings(settings_file(tmp_path, 'hostname = "{name}-{slot}"\n'))
    values = parse_values("slot,name\nA1,left\nA2,right\n07,seven\n", "v.csv")
    assert resolve(settings, values, DriveContext(1, "A2")).hostname == "right-A2"
    assert resolve(settings, values, DriveContext(2, 7)).hostname == "seven-7"
    with pytest.raises(SettingsError, match="has no row for drive 3"):
        resolve(settings, values, DriveContext(3, "B1"))
