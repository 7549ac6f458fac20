"""A real udisks2 and polkit for tests, on a private system bus, without udevd.

Everything runs inside one private mount namespace started by root (``unshare --mount``):

- a tmpfs on /run holding the udev database entries udisksd needs (it ignores devices udev
  has not initialised, and no udev daemon runs here; none is started);
- our own /etc/passwd and /etc/group (a test user and the ``popsicle`` group), bind-mounted so
  that polkitd, which looks groups up by user name, sees them and the host's files never change;
- polkit's action and rule directories replaced by ours (udisks' action file, the rule shipped
  in popsicle_py/data);
- a dbus-daemon with the stock system policy listening on a socket of ours, polkitd, and
  udisksd (unpacked from Debian's packages) under ``umockdev-run``, whose testbed presents real
  loop devices as a USB stick and a fixed SATA disk (``mknod`` with the loops' numbers).

The program under test runs in the same namespace (``nsenter``) as an unprivileged uid
(``setpriv``), preloaded with umockdev on the same testbed, so that it sees the same drives.
Stopping the namespace's process group kills every daemon and takes the mounts with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loopdev import DROP_OTHER_TESTS_MOUNTS

#: Where .ci/run unpacks udisks2 and its libraries (``dpkg-deb -x``), never installed.
UDISKS_ROOT = Path(os.environ.get("POPSICLE_UDISKS_ROOT", "/var/tmp/popsicle-udisks2"))
UDISKSD = "usr/libexec/udisks2/udisksd"
POLKITD = "/usr/lib/polkit-1/polkitd"
RULE = Path(__file__).resolve().parent.parent / "popsicle_py" / "data" / "50-popsicle-py.rules"

#: Ids of the test's own users; only the namespace's /etc/passwd knows them.
USER_UID = 64201  # member of the popsicle group
OTHER_UID = 64202  # not a member
GROUP_GID = 64200
GROUP = "popsicle"


#: Debian's udisks2 and what udisksd links to, unpacked and never installed: installing the
#: package would pull in and start udev, and no udev daemon may run under the other tests.
UDISKS_DEBS = ("udisks2", "libudisks2-0", "libblockdev2", "libblockdev-utils2", "libblockdev-fs2",
               "libblockdev-loop2", "libblockdev-part2", "libblockdev-swap2",
               "libblockdev-crypto2", "libblockdev-part-err2", "libgudev-1.0-0", "libatasmart4",
               "libbytesize1", "libbytesize-common", "libparted2", "libparted-fs-resize0")


def unpack_udisks() -> str | None:
    """Unpack the packages into UDISKS_ROOT once (apt-get download, dpkg-deb -x); why not."""
    if (UDISKS_ROOT / UDISKSD).exists():
        return None
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "apt-get and dpkg-deb are needed to unpack udisks2"
    UDISKS_ROOT.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{UDISKS_ROOT}.lock", "w") as lock:  # two test workers unpack it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (UDISKS_ROOT / UDISKSD).exists():
            return None
        return _unpack()


def _unpack() -> str | None:
    with tempfile.TemporaryDirectory() as debs:
        got = subprocess.run(["apt-get", "download", "-qq", *UDISKS_DEBS], cwd=debs,
                             capture_output=True, text=True)
        if got.returncode != 0:
            return f"apt-get download of udisks2 failed: {got.stderr.strip()[-200:]}"
        UDISKS_ROOT.mkdir(parents=True, exist_ok=True)
        for deb in sorted(Path(debs).glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(UDISKS_ROOT)], check=True)
    return None


def missing() -> str | None:
    """Why the harness cannot run here, or None (udisks2 is unpacked on first use)."""
    if os.geteuid() != 0:
        return "needs root (mount namespace, loop devices)"
    for tool in ("dbus-daemon", "umockdev-run", "unshare", "nsenter", "setpriv", "mknod"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path(POLKITD).exists():
        return "polkitd is not installed"
    why = unpack_udisks()
    if why is not None:
        return why
    if not (UDISKS_ROOT / UDISKSD).exists():
        return f"udisks2 is not unpacked in {UDISKS_ROOT}"
    return None


@dataclass(frozen=True)
class FakeDrive:
    """A loop device and how the testbed presents it."""

    name: str  # sdb
    loop: str  # /dev/loopN
    major: int
    minor: int
    size: int
    usb: bool
    #: The filesystem made on the whole drive (what udev's blkid would have recorded), or "".
    fs: str = ""

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


def _description(drive: FakeDrive, index: int) -> str:
    """A umockdev description: a SanDisk USB stick, or a fixed SATA disk."""
    sectors = drive.size // 512
    if drive.usb:
        base = f"/devices/pci0000:00/0000:00:14.0/usb1/1-{index + 2}"
        host = f"{base}/1-{index + 2}:1.0/host{index + 6}"
        return (
            f"P: {base}\nN: bus/usb/001/00{index + 2}\nE: DEVTYPE=usb_device\nE: SUBSYSTEM=usb\n"
            f"E: DRIVER=usb\nA: idVendor=0781\nA: idProduct=5567\n"
            f"A: serial=4C53000123110511730{index}\nA: manufacturer=SanDisk\n"
            f"A: product=Cruzer Blade\nA: remove=\n\n"
            f"P: {base}/1-{index + 2}:1.0\nE: DEVTYPE=usb_interface\nE: SUBSYSTEM=usb\n"
            f"E: DRIVER=usb-storage\nA: bInterfaceClass=08\n\n"
            f"P: {host}\nE: DEVTYPE=scsi_host\nE: SUBSYSTEM=scsi\n\n"
            f"P: {host}/target{index + 6}:0:0/{index + 6}:0:0:0\nE: DEVTYPE=scsi_device\n"
            f"E: SUBSYSTEM=scsi\nA: vendor=SanDisk\nA: model=Cruzer Blade\n\n"
            f"P: {host}/target{index + 6}:0:0/{index + 6}:0:0:0/block/{drive.name}\n"
            f"N: {drive.name}\nE: DEVNAME=/dev/{drive.name}\nE: DEVTYPE=disk\n"
            f"E: SUBSYSTEM=block\nE: MAJOR={drive.major}\nE: MINOR={drive.minor}\n"
            f"E: ID_BUS=usb\nA: removable=1\nA: size={sectors}\nA: ro=0\n"
            f"A: dev={drive.major}:{drive.minor}\nA: queue/logical_block_size=512\n\n"
        )
    host = f"/devices/pci0000:00/0000:00:17.0/ata{index + 1}/host{index}"
    return (
        f"P: {host}\nE: DEVTYPE=scsi_host\nE: SUBSYSTEM=scsi\n\n"
        f"P: {host}/target{index}:0:0/{index}:0:0:0\nE: DEVTYPE=scsi_device\nE: SUBSYSTEM=scsi\n"
        f"A: vendor=ATA\nA: model=Samsung SSD 860\n\n"
        f"P: {host}/target{index}:0:0/{index}:0:0:0/block/{drive.name}\nN: {drive.name}\n"
        f"E: DEVNAME=/dev/{drive.name}\nE: DEVTYPE=disk\nE: SUBSYSTEM=block\n"
        f"E: MAJOR={drive.major}\nE: MINOR={drive.minor}\nE: ID_BUS=ata\n"
        f"A: removable=0\nA: size={sectors}\nA: ro=0\nA: dev={drive.major}:{drive.minor}\n"
        f"A: queue/logical_block_size=512\n\n"
    )


def _udev_data(drive: FakeDrive, index: int) -> str:
    """What udevd would have written to /run/udev/data/b<MAJ>:<MIN> for the drive."""
    lines = [f"I:{int(time.monotonic() * 1e6)}", "E:DEVTYPE=disk"]
    if drive.usb:
        lines += ["E:ID_BUS=usb", "E:ID_VENDOR=SanDisk", "E:ID_VENDOR_ENC=SanDisk",
                  "E:ID_MODEL=Cruzer_Blade", "E:ID_MODEL_ENC=Cruzer\\x20Blade",
                  f"E:ID_SERIAL=SanDisk_Cruzer_Blade_4C53000123110511730{index}-0:0",
                  f"E:ID_SERIAL_SHORT=4C53000123110511730{index}", "E:ID_USB_DRIVER=usb-storage",
                  "E:ID_TYPE=disk"]
    else:
        lines += ["E:ID_BUS=ata", "E:ID_ATA=1", "E:ID_TYPE=disk",
                  "E:ID_MODEL=Samsung_SSD_860_EVO_500GB",
                  f"E:ID_SERIAL=Samsung_SSD_860_EVO_500GB_S3Z1NB0K12345{index}",
                  f"E:ID_SERIAL_SHORT=S3Z1NB0K12345{index}"]
    if drive.fs:
        lines += ["E:ID_FS_USAGE=filesystem", f"E:ID_FS_TYPE={drive.fs}"]
    return "\n".join(lines) + "\n"


def _bus_config(socket: Path, policy_dir: Path) -> str:
    """The stock system bus configuration, on our socket, as root, without activation."""
    text = Path("/usr/share/dbus-1/system.conf").read_text()
    for element in ("user", "pidfile", "servicehelper"):
        text = re.sub(rf"\s*<{element}>[^<]*</{element}>", "", text)
    for empty in ("fork", "standard_system_servicedirs", "syslog"):
        text = text.replace(f"<{empty}/>", "")
    # Ours, for the test's processes, and the standard path inside the namespace (its own
    # /run) for polkit's setuid helper, which ignores DBUS_SYSTEM_BUS_ADDRESS.
    text = re.sub(r"<listen>[^<]*</listen>",
                  f"<listen>unix:path={socket}</listen>"
                  "<listen>unix:path=/run/dbus/system_bus_socket</listen>", text)
    text = re.sub(r"<includedir>[^<]*</includedir>", "", text)
    text = re.sub(r"<include [^>]*>[^<]*</include>", "", text)
    # polkitd runs as root here (its unit's User=polkitd is systemd's doing).
    own = ('<policy user="root"><allow own="org.freedesktop.PolicyKit1"/>'
           '<allow send_interface="org.freedesktop.PolicyKit1.AuthenticationAgent"/></policy>')
    return text.replace("</busconfig>", f"{own}<includedir>{policy_dir}</includedir></busconfig>")


def _expose_python() -> str:
    """Shell lines that make this interpreter reachable by other uids inside the namespace.

    A pyenv under /root (mode 0700) is not: a tmpfs over the closed directory, holding a bind
    mount of the one child on the way to the interpreter, opens the path and nothing else.  A
    venv's prefix and the interpreter it links to (its base prefix) both need it.
    """
    lines = []
    done: set[Path] = set()
    for prefix in {Path(p).resolve() for p in (sys.prefix, sys.base_prefix)}:
        for directory in reversed(prefix.parents):
            if directory == Path("/") or directory.stat().st_mode & 0o001 or directory in done:
                continue
            done.add(directory)
            child = prefix.relative_to(directory).parts[0]
            stage = f"$W/stage-{child}"
            lines.append(
                f"mkdir -p {stage} && mount --bind {shlex.quote(str(directory / child))} {stage}"
                f" && mount -t tmpfs -o mode=755 popsicle-udisks-expose {directory}"
                f" && mkdir -p {directory / child} && mount --move {stage} {directory / child}")
            break
    return " && ".join(lines) or ":"


_NAMESPACE = r"""
set -eu
W=$1
@DROP@
mount -t tmpfs -o mode=755 popsicle-udisks-run /run
mkdir -p /run/udev/data /run/dbus
cp "$W"/udev/* /run/udev/data/
mount --bind "$W/etc/passwd" /etc/passwd
mount --bind "$W/etc/group" /etc/group
mount --bind "$W/etc/shadow" /etc/shadow
mount --bind "$W/polkit/actions" /usr/share/polkit-1/actions
mount --bind "$W/polkit/rules.d" /usr/share/polkit-1/rules.d
mkdir -p /etc/polkit-1/rules.d
mount --bind "$W/polkit/empty" /etc/polkit-1/rules.d
@EXPOSE@
@DEVNODES@
dbus-daemon --nofork --config-file="$W/bus.conf" 2>"$W/dbus.log" &
for _ in $(seq 200); do [ -S "$W/bus/socket" ] && break; sleep 0.05; done
export DBUS_SYSTEM_BUS_ADDRESS="unix:path=$W/bus/socket"
@POLKITD@ --no-debug >"$W/polkitd.log" 2>&1 &
umockdev-run -d "$W/devices.umockdev" -- bash "$W/udisksd.sh" >"$W/udisksd.log" 2>&1 &
wait
"""

#: /dev nodes named as udisks names them, for programs that do not go through umockdev (mount,
#: and libmount's table lookups in udisksd): an overlay on /dev, inside the namespace only.
_DEV_OVERLAY = r"""
mkdir -p /run/dev-up /run/dev-work /run/dev-stage
subs=""
for sub in shm pts mqueue hugepages; do
    if mountpoint -q "/dev/$sub"; then
        mkdir -p "/run/dev-stage/$sub" && mount --rbind "/dev/$sub" "/run/dev-stage/$sub"
        subs="$subs $sub"
    fi
done
mount -t overlay popsicle-udisks-dev \
    -o lowerdir=/dev,upperdir=/run/dev-up,workdir=/run/dev-work /dev
for sub in $subs; do mount --move "/run/dev-stage/$sub" "/dev/$sub"; done
"""

_UDISKSD = r"""
set -eu
W=@W@
chmod 755 "$UMOCKDEV_DIR"
# umockdev's preload in the user's process connects to this socket when it opens a node.
chmod 777 "$UMOCKDEV_DIR"/ioctl/_default
@MKNODS@
echo "$UMOCKDEV_DIR" > "$W/testbed.tmp" && mv "$W/testbed.tmp" "$W/testbed"
export LD_LIBRARY_PATH=@LIBS@
exec @UDISKSD@ --no-sigint
"""


class Udisks:
    """A running private udisks2 stack; :meth:`run` runs a command in it as a given uid."""

    def __init__(self, work: Path, process: subprocess.Popen[bytes], testbed: str) -> None:
        self.work = work
        self.process = process
        self.testbed = testbed
        self.address = f"unix:path={work / 'bus' / 'socket'}"

    def env(self, *, udisks: bool = True) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "HOME": str(self.work / "home"),
            "LANG": "C.UTF-8",
            "UMOCKDEV_DIR": self.testbed,
            "LD_PRELOAD": "libumockdev-preload.so.0",
        }
        if udisks:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        else:  # a bus where nobody listens: no udisks on this "system"
            env["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={self.work / 'no-bus'}"
        return env

    def command(self, argv: Sequence[str], *, uid: int = USER_UID, udisks: bool = True
                ) -> list[str]:
        """argv run inside the namespace as ``uid`` (with that user's groups)."""
        env = [f"{k}={v}" for k, v in self.env(udisks=udisks).items()]
        return ["nsenter", f"--target={self.process.pid}", "--mount", "--",
                "setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--",
                "env", "-i", *env, *argv]

    def run(self, argv: Sequence[str], *, uid: int = USER_UID, udisks: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv, uid=uid, udisks=udisks), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def as_root(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """argv inside the namespace as root, with every capability (to mount, say)."""
        return subprocess.run(["nsenter", f"--target={self.process.pid}", "--mount", "--",
                               *argv], capture_output=True, text=True, timeout=60, check=True)

    def mount_points(self, name: str) -> list[str]:
        """Where udisksd says the block device ``name`` (sdb) is mounted."""
        script = ("import sys; from jeepney import DBusAddress, new_method_call; "
                  "from jeepney.io.blocking import open_dbus_connection; "
                  "c = open_dbus_connection(bus=sys.argv[1]); "
                  "a = DBusAddress(sys.argv[2], 'org.freedesktop.UDisks2', "
                  "'org.freedesktop.DBus.Properties'); "
                  "r = c.send_and_get_reply(new_method_call(a, 'Get', 'ss', "
                  "('org.freedesktop.UDisks2.Filesystem', 'MountPoints'))); "
                  "print('\\n'.join(bytes(m).rstrip(b'\\0').decode() for m in r.body[0][1]))")
        got = subprocess.run(self.command([sys.executable, "-c", script, self.address,
                                           f"/org/freedesktop/UDisks2/block_devices/{name}"],
                                          uid=0), capture_output=True, text=True, timeout=30)
        return got.stdout.split()

    def logs(self) -> str:
        parts = []
        for name in ("dbus.log", "polkitd.log", "udisksd.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {name}\n{(self.work / name).read_text()[-4000:]}")
        return "\n".join(parts)


def _passwd() -> str:
    return (Path("/etc/passwd").read_text()
            + f"popsicle-test:x:{USER_UID}:{USER_UID}::/nonexistent:/bin/sh\n"
            + f"popsicle-other:x:{OTHER_UID}:{OTHER_UID}::/nonexistent:/bin/sh\n")


#: The test user's password, for polkit's text agent (only the namespace's /etc/shadow has it).
PASSWORD = "popsicle-test-password"
_PASSWORD_HASH = ("$6$popsicletest$ZvqVg/vLJcXRx/USv5Lh8GCtdlqHcv0yRyW8MwHo2SlnLljluQ34WPpGNHnmG"
                  "t/U3AWTDyH.WCuiUFV8JIscB1")


def _shadow() -> str:
    """Only the test's users (root locked): nothing of the host's shadow is copied."""
    return (f"root:*:19000:0:99999:7:::\npopsicle-test:{_PASSWORD_HASH}:19000:0:99999:7:::\n"
            "popsicle-other:*:19000:0:99999:7:::\n")


def _group() -> str:
    return (Path("/etc/group").read_text()
            + f"popsicle-test:x:{USER_UID}:\npopsicle-other:x:{OTHER_UID}:\n"
            + f"{GROUP}:x:{GROUP_GID}:popsicle-test\n")


@contextlib.contextmanager
def running(drives: Sequence[FakeDrive], rule: Path | None = RULE, extra_rule: str = "",
            timeout: float = 30, dev_nodes: bool = False) -> Iterator[Udisks]:
    """Start the stack for these drives; always stop it (every daemon, every mount).

    ``extra_rule`` is the text of a test's own polkit rule file, read before ``rule``.
    ``dev_nodes`` also makes /dev/sdb... real nodes in the namespace's /dev (for mounting).
    """
    work = Path(tempfile.mkdtemp(prefix="popsicle-udisks-", dir="/tmp"))
    work.chmod(0o755)
    process: subprocess.Popen[bytes] | None = None
    try:
        for sub in ("udev", "etc", "polkit/actions", "polkit/rules.d", "polkit/empty",
                    "bus/policy", "home"):
            (work / sub).mkdir(parents=True)
        (work / "bus").chmod(0o755)
        (work / "home").chmod(0o777)
        description = ""
        mknods = []
        for index, drive in enumerate(drives):
            description += _description(drive, index)
            (work / "udev" / f"b{drive.major}:{drive.minor}").write_text(_udev_data(drive, index))
            node = f'"$UMOCKDEV_DIR/dev/{drive.name}"'
            mknods.append(f"rm -f {node}; mknod {node} b {drive.major} {drive.minor}; "
                          f"chmod 1660 {node}; chgrp disk {node}")
        (work / "devices.umockdev").write_text(description)
        (work / "etc" / "passwd").write_text(_passwd())
        (work / "etc" / "group").write_text(_group())
        shadow = work / "etc" / "shadow"
        shadow.touch(0o600)
        shadow.write_text(_shadow())
        shutil.copy(UDISKS_ROOT / "usr/share/polkit-1/actions/org.freedesktop.UDisks2.policy",
                    work / "polkit" / "actions")
        if rule is not None:
            shutil.copy(rule, work / "polkit" / "rules.d")
        if extra_rule:
            (work / "polkit" / "rules.d" / "10-test.rules").write_text(extra_rule)
        for conf in (UDISKS_ROOT / "usr/share/dbus-1/system.d/org.freedesktop.UDisks2.conf",
                     Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")):
            shutil.copy(conf, work / "bus" / "policy")
        (work / "bus.conf").write_text(_bus_config(work / "bus" / "socket", work / "bus/policy"))
        libs = f"{UDISKS_ROOT}/usr/lib/x86_64-linux-gnu:{UDISKS_ROOT}/lib/x86_64-linux-gnu"
        (work / "udisksd.sh").write_text(
            _UDISKSD.replace("@W@", shlex.quote(str(work))).replace("@MKNODS@", "\n".join(mknods))
            .replace("@LIBS@", shlex.quote(str(libs)))
            .replace("@UDISKSD@", shlex.quote(str(UDISKS_ROOT / UDISKSD))))
        devnodes = ""
        if dev_nodes:
            devnodes = _DEV_OVERLAY + "".join(
                f"mknod /dev/{d.name} b {d.major} {d.minor}; chmod 660 /dev/{d.name}; "
                f"chgrp disk /dev/{d.name}\n" for d in drives)
        (work / "namespace.sh").write_text(
            _NAMESPACE.replace("@EXPOSE@", _expose_python()).replace("@POLKITD@", POLKITD)
            .replace("@DROP@", DROP_OTHER_TESTS_MOUNTS)
            .replace("@DEVNODES@", devnodes))
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash",
             str(work / "namespace.sh"), str(work)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        stack = Udisks(work, process, "")
        deadline = time.monotonic() + timeout
        while not (work / "testbed").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the udisks stack did not start\n{stack.logs()}")
            time.sleep(0.05)
        stack.testbed = (work / "testbed").read_text().strip()
        _wait_for_blocks(stack, drives, deadline)
        yield stack
    finally:
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            _kill_group_leftovers(process.pid)
        shutil.rmtree(work, ignore_errors=True)


def _kill_group_leftovers(pgid: int) -> None:
    """Daemons still alive in the namespace's process group get SIGKILL, and are waited for."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _wait_for_blocks(stack: Udisks, drives: Sequence[FakeDrive], deadline: float) -> None:
    """Poll udisksd (as root, from inside) until it exports a block object for every drive."""
    want = {f"/org/freedesktop/UDisks2/block_devices/{d.name}" for d in drives}
    script = ("import sys; from jeepney import DBusAddress, new_method_call; "
              "from jeepney.io.blocking import open_dbus_connection; "
              "c = open_dbus_connection(bus=sys.argv[1]); "
              "a = DBusAddress('/org/freedesktop/UDisks2', 'org.freedesktop.UDisks2', "
              "'org.freedesktop.DBus.ObjectManager'); "
              "r = c.send_and_get_reply(new_method_call(a, 'GetManagedObjects')); "
              "print('\\n'.join(p for p, i in r.body[0].items() "
              "if 'org.freedesktop.UDisks2.Block' in i))")
    while True:
        got = subprocess.run(stack.command([sys.executable, "-c", script, stack.address],
                                           uid=0), capture_output=True, text=True, timeout=30)
        if want <= set(got.stdout.split()):
            return
        if stack.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"udisksd did not export {sorted(want)}: {got.stdout!r} "
                               f"{got.stderr[-2000:]}\n{stack.logs()}")
        time.sleep(0.2)


@contextlib.contextmanager
def loop_devices(count: int, size: int, prefix: str) -> Iterator[list[tuple[str, Path]]]:
    """(loop device, backing file) pairs of our own on /dev/shm; detached (only these) and
    removed at the end."""
    made: list[tuple[str, Path]] = []
    try:
        for _ in range(count):
            backing = Path(f"/dev/shm/{prefix}-{uuid.uuid4().hex[:8]}.img")
            with open(backing, "wb") as f:
                f.truncate(size)
            made.append(("", backing))
            path = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                                  capture_output=True, text=True).stdout.strip()
            made[-1] = (path, backing)
        yield made
    finally:
        for path, backing in made:
            if path:
                subprocess.run(["losetup", "-d", path], capture_output=True)
            with contextlib.suppress(OSError):
                backing.unlink()


def fake_drive(name: str, loop: str, size: int, usb: bool, fs: str = "") -> FakeDrive:
    """How the testbed presents loop device ``loop`` as /dev/``name``."""
    rdev = os.stat(loop).st_rdev
    return FakeDrive(name, loop, os.major(rdev), os.minor(rdev), size, usb, fs)


def auth_self_for(*devices: str) -> str:
    """A test's own rule: opening ``devices`` (open-device, or -system for a fixed disk)
    asks popsicle-test for their own password."""
    listed = json.dumps(list(devices))
    return (
        "\npolkit.addRule(function(action, subject) {\n"
        '    if (action.id.indexOf("org.freedesktop.udisks2.open-device") === 0 &&\n'
        f'        {listed}.indexOf(action.lookup("device")) >= 0 &&\n'
        '        subject.user === "popsicle-test") {\n'
        "        return polkit.Result.AUTH_SELF;\n"
        "    }\n"
        "    return polkit.Result.NOT_HANDLED;\n"
        "});\n")


AUTH_SELF_FOR_SDC = auth_self_for("/dev/sdc")
#: The stick (removable: open-device, not -system).
AUTH_SELF_FOR_SDB = auth_self_for("/dev/sdb")
AUTH_SELF_FOR_STICKS = auth_self_for("/dev/sdb", "/dev/sdd")
