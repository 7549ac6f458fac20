"""The host's end of the VM tier: boot QEMU with emulated USB drives, talk to the guest.

A :class:`Guest` boots Debian's kernel (tests/vm/build.py) on the host's own root, shared
read-only over 9p, with an xHCI controller, a hub, USB sticks, a two-LUN card reader and two
internal disks (SATA, virtio) that must never be offered.  Commands run in the guest through
the agent (tests/vm/agent.py, a virtio-serial port); drives come and go through QMP
(``device_add``/``device_del``), so the guest kernel sees a real plug and a real pull.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import build

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MiB = 1 << 20
GUEST_SHARE = "/share"


class GuestError(RuntimeError):
    """The guest or QEMU did not do what was asked (with the console's tail for context)."""


@dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


@dataclass
class Disk:
    """One emulated drive and the host file behind it."""

    id: str
    file: Path
    size: int
    kind: str  # "usb-storage", "lun" (of a usb-bot reader), "sata" or "virtio"
    serial: str
    port: str | None = None  # the xHCI port QEMU was given ("1.2"), for USB drives

    def read(self, length: int, offset: int = 0) -> bytes:
        with open(self.file, "rb") as f:
            f.seek(offset)
            return f.read(length)


@dataclass
class Spawned:
    """A command running in the guest, its output in the share (readable from the host)."""

    guest: Guest
    pid: int
    stdout_file: Path
    stderr_file: Path

    def stdout(self) -> str:
        return self.stdout_file.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        """The complete lines so far (a line being written is left out)."""
        text = self.stdout()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def wait(self, timeout: float) -> int:
        reply = self.guest.request({"op": "wait", "pid": self.pid, "timeout": timeout},
                                   timeout + 30)
        if reply["rc"] is None:
            raise GuestError(f"pid {self.pid} still running after {timeout} s:\n"
                             f"{self.stdout()[-2000:]}\n{self.stderr()[-2000:]}")
        return int(reply["rc"])

    def signal(self, name: str) -> None:
        self.guest.request({"op": "signal", "pid": self.pid, "signal": name}, 30)

    def stop(self, grace: float = 20) -> None:
        """End it if it still runs (SIGTERM, then SIGKILL): a failed test leaves nothing."""
        if self.guest.request({"op": "wait", "pid": self.pid, "timeout": 0.1}, 30)["rc"] is None:
            self.signal("SIGTERM")
            if self.guest.request({"op": "wait", "pid": self.pid, "timeout": grace},
                                  grace + 30)["rc"] is None:
                self.signal("SIGKILL")


class _Channel:
    """JSON lines over a unix socket, with a reader thread that sorts replies from events."""

    def __init__(self, path: Path, deadline: float) -> None:
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"no socket at {path}") from None
                time.sleep(0.05)
        self.messages: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self.cond:
                    self.closed = True
                    self.cond.notify_all()
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    with self.cond:
                        self.messages.append(json.loads(line))
                        self.cond.notify_all()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def take(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first message ``match`` accepts (removed from the queue), waiting up to timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, message in enumerate(self.messages):
                    if match(message):
                        return self.messages.pop(i)
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise GuestError("timed out" if left <= 0 else "channel closed")
                self.cond.wait(left)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Topology:
    """The drives the guest boots with (more can be added while it runs)."""

    disks: list[Disk] = field(default_factory=list)
    hubs: list[str] = field(default_factory=list)  # xHCI ports with a usb-hub
    readers: list[tuple[str, str, str]] = field(default_factory=list)  # (id, port, serial)


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Wait for ``condition()`` to be truthy and return it; GuestError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise GuestError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Guest:
    """A booted guest; use as a context manager (QEMU is killed and files removed on exit)."""

    def __init__(self, topology: Topology, workdir: Path, files: build.GuestFiles,
                 smp: int = 2, memory: int = 1024) -> None:
        self.topology = topology
        self.workdir = workdir
        self.files = files
        self.share = workdir / "share"
        self.share.mkdir(parents=True, exist_ok=True)
        self.console = workdir / "console.log"
        self.smp, self.memory = smp, memory
        self.proc: subprocess.Popen[bytes] | None = None
        self.disks: dict[str, Disk] = {d.id: d for d in topology.disks}
        self._ids = 0
        self.hot: set[str] = set()  # drives added with blockdev-add (and a throttle group)
        self._qmp_lock = threading.Lock()
        self.boot_seconds = 0.0

    # -- starting and stopping ---------------------------------------------------------

    def _cmdline(self) -> str:
        init = {"pinit": HERE / "guest-init", "pfiles": self.files.root,
                "prelease": self.files.release, "ppython": sys.executable,
                "pagent": HERE / "agent.py"}
        return " ".join(["console=ttyS0", "loglevel=6", "panic=-1", "rdinit=/init",
                         "usbcore.autosuspend=-1", "modprobe.blacklist=floppy",
                         "tsc=reliable", "no_timer_check",
                         *(f"{k}={v}" for k, v in init.items())])

    def _argv(self) -> list[str]:
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(self.memory),
                "-smp", str(self.smp), "-nographic", "-no-reboot", "-nodefaults",
                "-serial", f"file:{self.console}", "-monitor", "none",
                "-kernel", str(self.files.kernel), "-initrd", str(self.files.initrd),
                "-append", self._cmdline(),
                "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                           "multidevs=remap",
                "-virtfs", f"local,path={self.share},mount_tag=share,security_model=none,"
                           "multidevs=remap",
                "-device", "virtio-serial-pci,id=vser",
                "-chardev", f"socket,id=agent,path={self.workdir / 'agent.sock'},server=on,"
                            "wait=off",
                "-device", "virtserialport,chardev=agent,name=popsicle.agent",
                "-qmp", f"unix:{self.workdir / 'qmp.sock'},server=on,wait=off",
                "-device", "qemu-xhci,id=xhci,p2=8,p3=8"]
        for port in self.topology.hubs:
            argv += ["-device", f"usb-hub,bus=xhci.0,port={port},id=hub{port.replace('.', '_')}"]
        if any(d.kind == "sata" for d in self.topology.disks):
            argv += ["-device", "ahci,id=ahci"]
        for reader_id, port, serial in self.topology.readers:
            argv += ["-device", f"usb-bot,bus=xhci.0,port={port},id={reader_id},serial={serial}"]
        sata = 0
        for disk in self.topology.disks:
            argv += ["-drive", f"if=none,id={disk.id},format=raw,file={disk.file},"
                               "cache=writeback,aio=threads"]
            if disk.kind == "usb-storage":
                argv += ["-device", f"usb-storage,bus=xhci.0,port={disk.port},drive={disk.id},"
                                    f"serial={disk.serial},removable=on,id=dev-{disk.id}"]
            elif disk.kind == "lun":
                reader, _, lun = (disk.port or "").partition(":")
                argv += ["-device", f"scsi-hd,bus={reader}.0,channel=0,scsi-id=0,lun={lun},"
                                    f"drive={disk.id},removable=on,serial={disk.serial},"
                                    f"id=dev-{disk.id}"]
            elif disk.kind == "sata":
                argv += ["-device", f"ide-hd,bus=ahci.{sata},drive={disk.id},"
                                    f"serial={disk.serial},id=dev-{disk.id}"]
                sata += 1
            elif disk.kind == "virtio":
                argv += ["-device", f"virtio-blk-pci,drive={disk.id},serial={disk.serial},"
                                    f"id=dev-{disk.id}"]
        return argv

    def start(self, timeout: float = 300) -> None:
        for disk in self.topology.disks:
            _make_file(disk.file, disk.size)
        started = time.monotonic()
        deadline = started + timeout
        with open(self.workdir / "qemu.log", "wb") as log:
            self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.qmp_channel = _Channel(self.workdir / "qmp.sock", deadline)
            self.qmp_channel.take(lambda m: "QMP" in m, timeout)
            self.qmp("qmp_capabilities")
            self.agent = _Channel(self.workdir / "agent.sock", deadline)
            self.agent.take(lambda m: m.get("ready") is True, deadline - time.monotonic())
        except GuestError as e:
            self.stop()
            raise GuestError(f"the guest did not boot: {e}\n{self.console_tail()}") from None
        self.boot_seconds = time.monotonic() - started

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.qmp("quit", timeout=10)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for channel in ("agent", "qmp_channel"):
            if hasattr(self, channel):
                getattr(self, channel).close()
        self.proc = None

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:])

    # -- the agent -----------------------------------------------------------------------

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        self._ids += 1
        ident = self._ids
        self.agent.send({**message, "id": ident})
        try:
            reply = self.agent.take(lambda m: m.get("id") == ident, timeout)
        except GuestError as e:
            raise GuestError(f"{message.get('op')} {message.get('argv', '')}: {e}\n"
                             f"{self.console_tail(20)}") from None
        if "error" in reply:
            raise GuestError(f"agent: {reply['error']}")
        return reply

    def run(self, argv: list[str], timeout: float = 120, env: dict[str, str] | None = None,
            input: str | None = None) -> Result:
        reply = self.request({"op": "run", "argv": argv, "timeout": timeout, "env": env,
                              "cwd": str(REPO), "input": input}, timeout + 30)
        if reply.get("timed_out"):
            raise GuestError(f"{argv} did not end in {timeout} s:\n{reply['stdout'][-2000:]}\n"
                             f"{reply['stderr'][-2000:]}")
        return Result(reply["rc"], reply["stdout"], reply["stderr"])

    def sh(self, script: str, timeout: float = 60) -> str:
        """Run a shell line in the guest; its stdout, or GuestError when it fails."""
        result = self.run(["/bin/sh", "-c", script], timeout)
        if result.rc != 0:
            raise GuestError(f"{script!r} exited {result.rc}: {result.stderr.strip()}")
        return result.stdout

    def popsicle(self, *args: str, timeout: float = 300) -> Result:
        return self.run(self.popsicle_argv(*args), timeout, env=self._env())

    def spawn_popsicle(self, *args: str) -> Spawned:
        return self.spawn(self.popsicle_argv(*args), env=self._env())

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> Spawned:
        name = uuid.uuid4().hex[:8]
        out, err = self.share / f"{name}.out", self.share / f"{name}.err"
        reply = self.request({"op": "spawn", "argv": argv, "env": env, "cwd": str(REPO),
                              "stdout": f"{GUEST_SHARE}/{out.name}",
                              "stderr": f"{GUEST_SHARE}/{err.name}"}, 60)
        return Spawned(self, reply["pid"], out, err)

    @staticmethod
    def popsicle_argv(*args: str) -> list[str]:
        return [sys.executable, "-m", "popsicle_py", *args]

    @staticmethod
    def _env() -> dict[str, str]:
        return {"PYTHONPATH": str(REPO), "COLUMNS": "200", "PYTHONDONTWRITEBYTECODE": "1"}

    def put(self, name: str, data: bytes) -> str:
        """A file in the share; returns its path in the guest."""
        (self.share / name).write_bytes(data)
        return f"{GUEST_SHARE}/{name}"

    # -- QMP: plugging and pulling ---------------------------------------------------------

    def qmp(self, command: str, args: dict[str, Any] | None = None, timeout: float = 60,
            **arguments: Any) -> Any:
        """Run a QMP command (arguments from ``args`` and keywords); its return value."""
        arguments = {**(args or {}), **arguments}
        with self._qmp_lock:
            self._ids += 1
            ident = f"q{self._ids}"
            message: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                message["arguments"] = arguments
            self.qmp_channel.send(message)
            reply = self.qmp_channel.take(lambda m: m.get("id") == ident, timeout)
        if "error" in reply:
            raise GuestError(f"QMP {command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def add_stick(self, disk_id: str, port: str, serial: str, size: int,
                  error_sector: int | None = None, file: Path | None = None,
                  bps_write: int = 0) -> Disk:
        """Plug a USB stick into ``port``; ``error_sector``: writes there fail with EIO.

        Its writes go through a throttle group (``bps_write``, 0: none) that
        :meth:`throttle` changes later.
        """
        disk = Disk(disk_id, file or self.workdir / f"{disk_id}.img", size, "usb-storage",
                    serial, port)
        _make_file(disk.file, size)
        image: dict[str, Any] = {"driver": "file", "filename": str(disk.file)}
        if error_sector is not None:
            image = {"driver": "blkdebug", "image": image, "inject-error": [
                {"event": "write_aio", "errno": 5, "sector": error_sector, "once": False}]}
        self.qmp("object-add", {"qom-type": "throttle-group", "id": f"tg-{disk_id}",
                                "limits": {"bps-write": bps_write}})
        self.qmp("blockdev-add", {"node-name": f"raw-{disk_id}", "driver": "raw",
                                  "file": image})
        self.qmp("blockdev-add", {"node-name": disk_id, "driver": "throttle",
                                  "throttle-group": f"tg-{disk_id}", "file": f"raw-{disk_id}"})
        self.hot.add(disk_id)
        self.qmp("device_add", driver="usb-storage", bus="xhci.0", port=port, drive=disk_id,
                 serial=serial, removable=True, id=f"dev-{disk_id}")
        self.disks[disk_id] = disk
        return disk

    def pull(self, disk_id: str, timeout: float = 60) -> None:
        """Unplug a drive (QMP device_del) and wait until QEMU says it is gone."""
        dev = f"dev-{disk_id}"
        self.qmp("device_del", id=dev)
        self.qmp_channel.take(lambda m: m.get("event") == "DEVICE_DELETED"
                              and m.get("data", {}).get("device") == dev, timeout)
        if disk_id in self.hot:
            self.hot.discard(disk_id)
            with contextlib.suppress(GuestError):
                self.qmp("blockdev-del", {"node-name": disk_id})
                self.qmp("blockdev-del", {"node-name": f"raw-{disk_id}"})
                self.qmp("object-del", id=f"tg-{disk_id}")

    def throttle(self, disk_id: str, bps_write: int) -> None:
        """Limit a drive's write rate (0: no limit), as a slow stick would."""
        if disk_id in self.hot:
            self.qmp("qom-set", path=f"tg-{disk_id}", property="limits",
                     value={"bps-write": bps_write})
        else:  # a drive given on the command line has a named block backend
            self.qmp("block_set_io_throttle", device=disk_id, bps=0, bps_rd=0,
                     bps_wr=bps_write, iops=0, iops_rd=0, iops_wr=0)

    # -- what the guest sees ------------------------------------------------------------

    def block_devices(self) -> dict[str, str]:
        """Guest disk name -> serial as the guest's udev has it, for every sd/vd disk.

        Read from udev's database with one grep per disk: a udevadm per disk costs a second
        each under emulation.
        """
        out = self.sh("cd /sys/block && for d in sd* vd*; do [ -e $d/dev ] || continue; "
                      "read n < $d/dev; s=$(grep -s '^E:ID_SERIAL_SHORT=' /run/udev/data/b$n); "
                      "echo \"$d ${s#E:ID_SERIAL_SHORT=}\"; done")
        found: dict[str, str] = {}
        for line in out.splitlines():
            name, _, serial = line.partition(" ")
            if name:
                found[name] = serial
        return found

    def settle(self) -> None:
        self.sh("udevadm settle --timeout=60", timeout=90)


def _make_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def default_topology(workdir: Path) -> Topology:
    """What the VM tier boots with: see tests/test_vm.py for what each drive is for."""
    d = workdir / "disks"
    return Topology(
        hubs=["1"],
        readers=[("reader", "3", "READER-0001")],
        disks=[
            Disk("hubstick", d / "hubstick.img", 48 * MiB, "usb-storage", "HUB-0001", "1.1"),
            Disk("stick", d / "stick.img", 48 * MiB, "usb-storage", "DUP-0001", "2"),
            Disk("twin", d / "twin.img", 48 * MiB, "usb-storage", "DUP-0001", "4"),
            Disk("lun0", d / "lun0.img", 40 * MiB, "lun", "READER-0001", "reader:0"),
            Disk("lun1", d / "lun1.img", 44 * MiB, "lun", "READER-0001", "reader:1"),
            Disk("sata", d / "sata.img", 64 * MiB, "sata", "SATA-0001"),
            Disk("virtio", d / "virtio.img", 64 * MiB, "virtio", "VIRT-0001"),
        ])


@contextlib.contextmanager
def booted(topology: Callable[[Path], Topology] = default_topology) -> Iterator[Guest]:
    """Build (or reuse) the guest files, boot, yield the guest, and clean everything up."""
    files = build.prepare()
    workdir = Path(f"/dev/shm/popsicle-vm-{uuid.uuid4().hex[:8]}")
    workdir.mkdir()
    guest = Guest(topology(workdir), workdir, files)
    try:
        guest.start()
        yield guest
    finally:
        guest.stop()
        if os.environ.get("POPSICLE_VM_KEEP"):
            print(f"popsicle-vm: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
