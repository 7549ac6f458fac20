"""flash --customize: a Raspberry-Pi-like xz image (MBR and GPT) to loop devices, each drive its
own hostname and key; the files read back with mtools, ``fsck.vfat -n`` clean, every byte
outside the boot partition the image's, the records hold the values with secrets redacted;
bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
import lzma
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pi_image
import pytest
from conftest import Loop, popsicle_cmd
from station_rig import slot_map
from test_watch import WATCHING, C, needs_testbed, watch

from popsicle_py.settings.fat import geometry

pytestmark = pytest.mark.root
KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK7y7UxIbBf10hjkkKaoDhFxSFdfZG1ZjTmXCUdxf9Rz a@x",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBmPaiN7m1JqV5Lz2EJ6jG4hRkU8nXhIjIOQvcrsIYjP b@x"]
SETTINGS = """\
hostname = "{hostname}"
user = "station"
password = "correct horse battery"
ssh_authorized_keys = ["{ssh_key}"]
timezone = "Europe/Berlin"
[wifi]
ssid = "classroom"
passphrase = "very secret words"
country = "DE"
"""
FILL = 0x5A


#: Address space for a run that must not read or build without limit: a run that does ends
#: in a MemoryError (exit 1) here, not by taking the machine's memory.
MEMORY_LIMIT = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def popsicle(*args: object, timeout: float = 120, limited: bool = False
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          preexec_fn=_limit_memory if limited else None)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a refusal says (exit 2)."""
    assert done.returncode == 2, done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def inputs(tmp_path: Path, settings: str | bytes = SETTINGS,
           rows: str = f"seq,hostname,ssh_key\n1,pi-01,{KEYS[0]}\n2,pi-02,{KEYS[1]}\n"
           ) -> tuple[Path, Path]:
    toml, values = tmp_path / "settings.toml", tmp_path / "class.csv"
    toml.write_bytes(settings if isinstance(settings, bytes) else settings.encode())
    values.write_text(rows)
    return toml, values


def mtype(loop: Loop, offset: int, name: str) -> bytes:
    return subprocess.run(["mtype", "-i", f"{loop.path}@@{offset}", f"::/{name}"], check=True,
                          capture_output=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}
                          ).stdout


def fsck_clean(loop: Loop, offset: int, size: int) -> subprocess.CompletedProcess[str]:
    window = subprocess.run(["losetup", "-r", "-f", "--show", "-o", str(offset),
                             "--sizelimit", str(size), loop.path],
                            check=True, capture_output=True, text=True).stdout.strip()
    try:
        return subprocess.run(["fsck.vfat", "-n", window], capture_output=True, text=True)
    finally:
        subprocess.run(["losetup", "-d", window], check=True)


def summary_of(stdout: str) -> dict[str, Any]:
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events[-1]["event"] == "summary"
    return events[-1]


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_flash_two_drives_each_its_own_settings(tmp_path: Path, table: str,
                                                loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path, table=table, xz=True)
    original = lzma.decompress(image.read_bytes())
    toml, values = inputs(tmp_path)
    loops = [loop_factory(len(original) + (4 << 20), fill=FILL) for _ in range(2)]
    report = tmp_path / "report.jsonl"
    done = popsicle("flash", image, *(lp.path for lp in loops), "--yes", "--json",
                    "--customize", toml, "--values", values, "--customize-format", "cloud-init",
                    "--report", report, "--no-trim")  # every byte: the rest is compared below
    assert done.returncode == 0, done.stderr + done.stdout
    summary = summary_of(done.stdout)
    part_offset, part_size = 4 << 20, 40 << 20
    for seq, (loop, result) in enumerate(zip(loops, summary["results"], strict=True), 1):
        assert result["status"] == "ok" and result["device"] == loop.path
        user_data = mtype(loop, part_offset, "user-data").decode()
        assert f'hostname: "pi-0{seq}"' in user_data and KEYS[seq - 1] in user_data
        assert "correct horse" not in user_data and "$6$" in user_data
        assert b"very secret" not in mtype(loop, part_offset, "network-config")
        assert mtype(loop, part_offset, "config.txt") == pi_image.CONFIG
        assert mtype(loop, part_offset, "cmdline.txt") == pi_image.CMDLINE
        fsck = fsck_clean(loop, part_offset, part_size)
        assert fsck.returncode == 0, fsck.stdout
        written = Path(loop.backing).read_bytes()
        end = part_offset + part_size
        assert written[:part_offset] == original[:part_offset]  # the head too, written last
        assert written[end:len(original)] == original[end:]
        assert written[len(original):] == bytes([FILL]) * (len(written) - len(original))
        record = result["customized"]
        assert record["format"] == "cloud-init"
        assert record["values"]["hostname"] == f"pi-0{seq}"
        assert record["values"]["password"] == "<redacted>"
        assert record["values"]["wifi"]["passphrase"] == "<redacted>"
        assert len(record["files_sha256"]) == 64
    ids = {mtype(lp, part_offset, "meta-data") for lp in loops}
    assert len(ids) == 2  # a distinct instance-id per drive
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["customized"]["values"]["hostname"] for r in lines) == ["pi-01", "pi-02"]
    assert "correct horse" not in report.read_text() + done.stdout + done.stderr


def test_firstrun_format_hooks_cmdline(tmp_path: Path,
                                       loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    toml, values = inputs(tmp_path)
    loop = loop_factory(image.stat().st_size)
    report = tmp_path / "report.csv"
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml, "--values",
                    values, "--report", report)
    assert done.returncode == 0, done.stderr + done.stdout
    assert f"{loop.path}: first-boot settings written (firstrun, hostname pi-01)" in done.stdout
    script = mtype(loop, 4 << 20, "firstrun.sh")
    assert script.startswith(b"#!/bin/bash") and b"pi-01" in script
    assert b"systemd.run=/boot/firmware/firstrun.sh" in mtype(loop, 4 << 20, "cmdline.txt")
    (row,) = csv.DictReader(report.read_text().splitlines())
    assert json.loads(row["customized"])["format"] == "firstrun"


BAD = {
    "missing-column": ('hostname = "{name}"\n', None, "names no column"),
    "fewer-rows": (None, f"seq,hostname,ssh_key\n1,pi-01,{KEYS[0]}\n", "has no row for drive 2"),
    "duplicate-hostname": (None, f"seq,hostname,ssh_key\n1,pi,{KEYS[0]}\n2,PI,{KEYS[1]}\n",
                           "would be given to two drives"),
    "unknown-setting": ('hostnmae = "x"\n', None, "unknown setting 'hostnmae'"),
    "malformed-key": (None, "seq,hostname,ssh_key\n1,a,ssh-ed25519 AAAA\n2,b,x\n",
                      "malformed SSH key"),
    "bad-country": (SETTINGS.replace('"DE"', '"EU"'), None, "not an ISO 3166"),
    # Control characters and line breaks: cloud-init would ignore the whole user-data, or a
    # key's second line would be an unchecked authorized key.
    "delete-in-key": (None, f"seq,hostname,ssh_key\n1,a,{KEYS[0]}\x7f\n2,b,{KEYS[1]}\n",
                      "ssh_authorized_keys holds a control character or line break (U+007F)"),
    "newline-in-key": (SETTINGS.replace('"{ssh_key}"', '"{ssh_key}\\nssh-rsa AAAA junk"'),
                       None, "ssh_authorized_keys holds a control character or line break"),
    "next-line-in-ssid": (SETTINGS.replace('"classroom"', '"class\\u0085room"'), None,
                          "wifi.ssid holds a control character or line break (U+0085)"),
    "line-separator-in-key": (None, f"seq,hostname,ssh_key\n1,a,{KEYS[0]}\u2028x\n"
                              f"2,b,{KEYS[1]}\n", "line break (U+2028)"),
    "newline-in-password": (SETTINGS.replace("correct horse", "correct\\nhorse"), None,
                            "password holds a control character or line break (U+000A)"),
    # crypt() refuses 512 bytes or more: the user could never log in.
    "long-password": (SETTINGS.replace("correct horse battery", "é" * 256), None,
                      "password is 512 bytes"),
    # firstrun renames the image's first user and sets its password: no password, no user.
    "firstrun-user-without-password": (SETTINGS.replace('password = "correct horse battery"\n',
                                                        ""), None,
                                       "firstrun format needs a password or password_hash"),
    # ssh on, no key and no password authentication: no one could log in over SSH.
    "ssh-without-a-way-in": ('user = "station"\npassword = "pw"\nssh = true\n', None,
                             "ssh = true without ssh_authorized_keys needs "
                             "ssh_password_auth = true"),
    # ssh off with keys: firstrun left the keys out, cloud-init installed them.
    "ssh-off-with-keys": (f'user = "station"\npassword = "pw"\nssh = false\n'
                          f'ssh_authorized_keys = ["{KEYS[0]}"]\n', None,
                          "ssh = false with ssh_authorized_keys: keys for an SSH that is off"),
    "not-utf-8": (b'hostname = "caf\xe9"\n', None, "settings.toml: not UTF-8 text"),
    # Names FAT cannot hold as given: the drive would be written, then fail.
    "file-dot-dot": (SETTINGS + '[files]\n".." = "welcome.txt"\n', None,
                     "[files] '..': not a file name"),
    "file-ends-in-dot": (SETTINGS + '[files]\n"a." = "welcome.txt"\n', None,
                         "[files] 'a.': not a file name"),
    "file-device-name": (SETTINGS + '[files]\n"CON" = "welcome.txt"\n', None,
                         "[files] 'CON': CON is a DOS device name"),
    "file-device-name-ext": (SETTINGS + '[files]\n"lpt9.txt" = "welcome.txt"\n', None,
                             "[files] 'lpt9.txt': LPT9 is a DOS device"),
    "file-names-equal-ignoring-case": (SETTINGS + '[files]\n"A.txt" = "welcome.txt"\n'
                                       '"a.txt" = "welcome.txt"\n', None,
                                       "[files] 'a.txt': the same name as A.txt"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, case: str,
                                                   loop_factory: Callable[..., Loop]) -> None:
    settings, rows, message = BAD[case]
    image = pi_image.build(tmp_path, table="gpt")  # firstrun unless told: cmdline.txt only
    (tmp_path / "welcome.txt").write_text("welcome\n")
    toml, values = inputs(tmp_path, settings or SETTINGS, **({"rows": rows} if rows else {}))
    loops = [loop_factory(image.stat().st_size, fill=FILL) for _ in range(2)]
    done = popsicle("flash", image, *(lp.path for lp in loops), "--yes", "--customize", toml,
                    "--values", values)
    assert done.returncode == 2, done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.stderr
    for loop in loops:
        assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


#: libyaml's loader, as netplan reads (PyYAML's own gives lone surrogates for what libyaml
#: refuses): the values must come back as given, emoji included.
YAML_LOAD = ("import json, sys, yaml; "
             "print(json.dumps(yaml.load(sys.stdin.buffer, Loader=yaml.CSafeLoader)))")


def test_cloud_init_files_are_ascii_and_read_back_as_given(tmp_path: Path,
                                                           loop_factory: Callable[..., Loop]
                                                           ) -> None:
    """Non-ASCII text (an SSID, a key's comment) is written as YAML escapes: the files are
    ASCII, and a YAML reader (PyYAML, as cloud-init and netplan use) gives back each value."""
    image = pi_image.build(tmp_path, table="mbr")
    key = KEYS[0].replace(" a@x", " José@café 🐱")
    settings = SETTINGS.replace('"classroom"', '"Café ☕ 🏠 1"')
    toml, values = inputs(tmp_path, settings, f"seq,hostname,ssh_key\n1,pi-01,{key}\n")
    loop = loop_factory(image.stat().st_size)
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml, "--values", values,
                    "--customize-format", "cloud-init")
    assert done.returncode == 0, done.stderr + done.stdout
    read: dict[str, Any] = {}
    for name in ("user-data", "network-config"):
        data = mtype(loop, 4 << 20, name)
        assert data.isascii(), data
        read[name] = json.loads(subprocess.run(["/usr/bin/python3", "-c", YAML_LOAD],
                                               input=data, capture_output=True, check=True
                                               ).stdout)
    assert read["user-data"]["users"][0]["ssh_authorized_keys"] == [key]
    assert list(read["network-config"]["network"]["wifis"]["wlan0"]["access-points"]) == \
        ["Café ☕ 🏠 1"]


def test_image_without_boot_partition_is_refused(tmp_path: Path,
                                                 loop_factory: Callable[..., Loop]) -> None:
    image = tmp_path / "plain.img"
    image.write_bytes(os.urandom(2 << 20))
    toml, values = inputs(tmp_path)
    loop = loop_factory(4 << 20, fill=FILL)
    done = popsicle("flash", image, loop.path, "--yes", "--force", "--customize", toml,
                    "--values", values)
    assert done.returncode == 2, done.stderr
    assert "cannot customise this image" in done.stderr
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


def _scribble_at(image: Path, where: str) -> int:
    """Where a bad writer also writes: into another file's cluster, or the second FAT."""
    data = image.read_bytes()
    if where == "file":
        return data.find(bytes(range(256)) * 16, 4 << 20) + 8192
    geo = geometry(data[4 << 20:(4 << 20) + 512])
    return (4 << 20) + geo.reserved + geo.fat_size + 1000 * 4  # a free cluster's entry


@pytest.mark.parametrize("where,bytes_,caught_by", [
    ("file", "X", "changed outside the files written"),
    ("fat2", "\\377\\377\\377\\017", "fsck.vfat -n found problems in the boot partition: "
     "FATs differ"),
])
def test_a_drive_whose_boot_partition_is_not_right_fails_with_its_head_unwritten(
        tmp_path: Path, loop_factory: Callable[..., Loop], where: str, bytes_: str,
        caught_by: str) -> None:
    """An mcopy that also scribbles elsewhere (a stand-in for a bad writer or a drive that
    aliases): on another file, caught by the block comparison; on the second FAT only, which
    the comparison allows, caught by fsck.vfat.  The drive fails and its head is never written
    (no bootable half-drive)."""
    image = pi_image.build(tmp_path, table="gpt")
    original = image.read_bytes()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mcopy").write_text(
        "#!/bin/sh\n/usr/bin/mcopy \"$@\" || exit\n"
        "while [ \"$1\" != -i ]; do shift; done\n"
        f"printf '{bytes_}' | dd of=\"${{2%@@*}}\" bs=1 seek={_scribble_at(image, where)} "
        "conv=notrunc status=none\n")
    (fake / "mcopy").chmod(0o755)
    toml, values = inputs(tmp_path)
    good, bad = (loop_factory(len(original), fill=FILL) for _ in range(2))
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), good.path, "--yes",
                           "--json", "--customize", str(toml), "--values", str(values)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), bad.path, "--yes", "--json",
                           "--customize", str(toml), "--values", str(values)],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 1, done.stderr + done.stdout
    (result,) = summary_of(done.stdout)["results"]
    assert result["status"] == "failed" and result["customized"] is None
    assert caught_by in result["error"], result["error"]
    head = Path(bad.backing).read_bytes()[:64 << 10]
    assert head != original[:64 << 10] and head != bytes([FILL]) * len(head)  # the stamp


def test_without_mtools_the_run_is_refused_before_writing(tmp_path: Path,
                                                          loop_factory: Callable[..., Loop]
                                                          ) -> None:
    image = pi_image.build(tmp_path, table="gpt")
    toml, values = inputs(tmp_path)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    env = {**os.environ, "PATH": "/usr/sbin:/sbin"}  # fsck.vfat, but no mcopy
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), loop.path, "--yes",
                           "--customize", str(toml), "--values", str(values)],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs mcopy (apt-get install mtools)" in lines[0], lines
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


def test_a_certificate_and_customize_together_are_refused(tmp_path: Path,
                                                          loop_factory: Callable[..., Loop]
                                                          ) -> None:
    """A certificate vouches for the image byte for byte: not for a customised drive."""
    image = pi_image.build(tmp_path, table="mbr")
    toml, values = inputs(tmp_path)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml, "--values",
                    values, "--certificate", tmp_path / "certs")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--certificate" in lines[0], lines
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


def test_files_that_do_not_fit_are_refused_before_anything_is_written(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """45 MiB of [files] for a boot partition of 40 MiB: one line, exit 2, the drives as they
    were (not written, verified, then failed at mcopy's "Disk full")."""
    image = pi_image.build(tmp_path, table="mbr", xz=True)
    (tmp_path / "big.bin").write_bytes(os.urandom(45 << 20))
    toml, values = inputs(tmp_path, SETTINGS + '[files]\n"big.bin" = "big.bin"\n')
    loops = [loop_factory(64 << 20, fill=FILL) for _ in range(2)]
    done = popsicle("flash", image, *(lp.path for lp in loops), "--yes", "--customize", toml,
                    "--values", values)
    line = one_line(done)
    assert "the first-boot files need at least 45." in line and "MiB free" in line, line
    assert "big.bin" in line, line
    for loop in loops:
        assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


@pytest.mark.parametrize("command", ["watch", "station"])
def test_a_session_whose_files_cannot_fit_is_refused_before_watching(tmp_path: Path,
                                                                     command: str) -> None:
    """watch and station: every stick would be written and failed; the session is refused
    up front instead."""
    image = pi_image.build(tmp_path, table="gpt")
    (tmp_path / "big.bin").write_bytes(os.urandom(45 << 20))
    toml, values = inputs(tmp_path, SETTINGS + '[files]\n"big.bin" = "big.bin"\n')
    station = [] if command == "watch" else [
        "--slots", slot_map(tmp_path / "slots.toml", {"A1": 3}),
        "--journal", tmp_path / "j.sqlite", "--listen", "127.0.0.1:0"]
    done = popsicle(command, image, "--yes", *station, "--customize", toml, "--values",
                    values, timeout=60)
    assert "the first-boot files need at least 45." in one_line(done)


def just_over(tmp_path: Path, image: Path) -> str:
    """A [files] table whose one file fills the boot partition's free space (as mtools counts
    it) less a cluster for each file the firstrun format writes: the run is not refused up
    front, but no drive's real files (a first-run script of kilobytes) fit."""
    cluster = geometry(image.read_bytes()[4 << 20:(4 << 20) + 512]).cluster
    out = subprocess.run(["mdir", "-i", f"{image}@@{4 << 20}", "::/"], capture_output=True,
                         text=True, check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}
                         ).stdout
    (line,) = [line for line in out.splitlines() if line.endswith("bytes free")]
    free = int(line.removesuffix("bytes free").replace(" ", ""))
    (tmp_path / "big.bin").write_bytes(os.urandom(free - 2 * cluster))
    return '[files]\n"big.bin" = "big.bin"\n'


def test_a_drive_whose_own_files_do_not_fit_is_refused_before_writing(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    toml, values = inputs(tmp_path, SETTINGS + just_over(tmp_path, image))
    loops = [loop_factory(image.stat().st_size, fill=FILL) for _ in range(2)]
    done = popsicle("flash", image, *(lp.path for lp in loops), "--yes", "--customize", toml,
                    "--values", values)
    line = one_line(done)
    assert "drive 1: the first-boot files need 3" in line and "MiB free" in line, line
    for loop in loops:
        assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


@needs_testbed
@pytest.mark.umockdev
def test_watch_takes_no_stick_whose_files_do_not_fit(tmp_path: Path) -> None:
    """The stick is announced with the reason and never written; the session goes on."""
    image = pi_image.build(tmp_path, table="mbr")
    toml, values = inputs(tmp_path, SETTINGS + just_over(tmp_path, image))
    run = watch(tmp_path, [str(image), "--yes", "--customize", str(toml), "--values",
                           str(values)],
                [WATCHING, {"add": C.description},
                 {"wait": {"event": "drive_added", "device": C.dev}},
                 {"signal": int(signal.SIGTERM)}],
                read=(C.dev,), timeout=60)
    (added,) = run.of("drive_added", device=C.dev)
    assert added["eligible"] is False, added
    assert "not written: drive 1 (serial " in added["reason"], added
    assert "): the first-boot files need 3" in added["reason"], added
    assert run.files[C.dev] == b""  # never written
    assert C.dev not in run.results()


@pytest.mark.parametrize("source,kind", [
    ("/dev/zero", "a character device"),  # read until memory ran out
    ("loop", "a block device"),  # the target drive itself, read whole into memory
    ("fifo", "a FIFO"),  # waited on for a writer, for ever
])
def test_a_files_source_that_is_not_a_regular_file_is_refused(
        tmp_path: Path, loop_factory: Callable[..., Loop], source: str, kind: str) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    loop = loop_factory(image.stat().st_size, fill=FILL)
    if source == "fifo":
        os.mkfifo(tmp_path / "fifo")
        source = str(tmp_path / "fifo")
    elif source == "loop":
        source = loop.path
    toml, values = inputs(tmp_path, SETTINGS + f'[files]\n"a.txt" = "{source}"\n')
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml, "--values",
                    values, timeout=60, limited=True)
    line = one_line(done)
    assert f"[files] 'a.txt': {source}: not a regular file ({kind})" in line, line
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


def test_a_files_name_of_a_boot_directory_is_refused(tmp_path: Path,
                                                    loop_factory: Callable[..., Loop]) -> None:
    """Raspberry Pi OS's boot partition has overlays/: a file of that name cannot be written
    there (mcopy fails), so it is refused before, not found after the drive is written."""
    image = pi_image.build(tmp_path, table="mbr")
    subprocess.run(["mmd", "-i", f"{image}@@{4 << 20}", "::/overlays"], check=True)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    (tmp_path / "hello.txt").write_text("hello\n")
    toml, values = inputs(tmp_path, SETTINGS + '[files]\n"Overlays" = "hello.txt"\n')
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml, "--values",
                    values, timeout=60)
    line = one_line(done)
    assert "[files] 'Overlays': the image's boot partition has a directory of that name" \
        in line, line
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


def test_files_sources_too_large_together_are_refused(tmp_path: Path,
                                                     loop_factory: Callable[..., Loop]) -> None:
    """Each under the limit, together over it: all are held in memory at once, so the limit
    is for them all (before, twelve 250 MiB files were read, 3 GB)."""
    image = pi_image.build(tmp_path, table="mbr")
    loop = loop_factory(image.stat().st_size, fill=FILL)
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(100 << 20)  # sparse
    entries = "".join(f'"big{i}.bin" = "big.bin"\n' for i in range(3))
    toml, values = inputs(tmp_path, SETTINGS + "[files]\n" + entries)
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml, "--values",
                    values, timeout=60, limited=True)
    line = one_line(done)
    assert "[files] 'big2.bin'" in line and "at most 256 MiB for all the [files] together" \
        in line, line
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


def test_a_files_source_too_large_to_hold_is_refused(tmp_path: Path,
                                                     loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    loop = loop_factory(image.stat().st_size, fill=FILL)
    with open(tmp_path / "huge.bin", "wb") as f:
        f.truncate((256 << 20) + 1)  # sparse
    toml, values = inputs(tmp_path, SETTINGS + '[files]\n"huge.bin" = "huge.bin"\n')
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml, "--values",
                    values, timeout=60, limited=True)
    assert f"{(256 << 20) + 1} bytes; at most 256 MiB" in one_line(done)
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


@pytest.mark.parametrize("template", ["pi-{seq:09999999999}", "pi-{seq:>65}",
                                      "pi-{seq:.99999999f}", "pi-{seq:" + "9" * 5000 + "}"])
def test_a_template_field_too_wide_is_refused_before_it_is_built(
        tmp_path: Path, loop_factory: Callable[..., Loop], template: str) -> None:
    """{seq:09999999999} would build a 10 GB string (killed, or an empty MemoryError)."""
    image = pi_image.build(tmp_path, table="mbr")
    loop = loop_factory(image.stat().st_size, fill=FILL)
    toml, values = inputs(tmp_path, SETTINGS.replace('"{hostname}"', f'"{template}"'))
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml, "--values",
                    values, timeout=60, limited=True)
    line = one_line(done)
    assert "hostname: bad template {seq:" in line and "a width or precision over 64" in line
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


def test_an_unexpected_error_that_says_nothing_is_named() -> None:
    """A MemoryError's text is empty: the line names it rather than saying nothing."""
    code = ("from popsicle_py.cli.guard import run_guarded\n"
            "def body() -> int:\n    raise MemoryError\n"
            "run_guarded(False, False, body)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "popsicle-py: unexpected error: MemoryError (run with --debug to see where)"]
