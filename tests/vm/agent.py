"""The guest's end of the VM tier: runs commands the host sends over a virtio-serial port.

One JSON object per line each way.  Requests carry an ``id`` and an ``op``; each is served in
its own thread so a long ``run`` does not hold up a ``wait`` or a ``signal``.  Stdlib only: it
runs under the host's interpreter inside the guest, before anything is installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PORT_NAME = "popsicle.agent"


def find_port() -> str:
    for entry in Path("/sys/class/virtio-ports").iterdir():
        if (entry / "name").read_text().strip() == PORT_NAME:
            return f"/dev/{entry.name}"
    raise SystemExit(f"agent: no virtio port named {PORT_NAME}")


class Agent:
    def __init__(self, port: str) -> None:
        fd = os.open(port, os.O_RDWR)
        self.reader = os.fdopen(fd, "rb", buffering=0)
        self.writer = os.fdopen(os.dup(fd), "wb", buffering=0)
        self.lock = threading.Lock()
        self.children: dict[int, subprocess.Popen[bytes]] = {}

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self.lock:
            self.writer.write(data)

    def serve(self) -> None:
        self.send({"ready": True, "uname": os.uname().release})
        buffer = b""
        while True:
            chunk = self.reader.read(65536)
            if not chunk:
                time.sleep(0.05)  # the host is not connected (yet): a virtio port reads 0
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                if request.get("op") == "exit":
                    self.send({"id": request["id"], "ok": True})
                    return
                threading.Thread(target=self.handle, args=(request,), daemon=True).start()

    def handle(self, request: dict[str, Any]) -> None:
        try:
            reply = getattr(self, "op_" + request["op"])(request)
        except Exception as e:  # report every failure to the host, which raises it
            reply = {"error": f"{type(e).__name__}: {e}"}
        reply["id"] = request["id"]
        self.send(reply)

    @staticmethod
    def _env(request: dict[str, Any]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(request.get("env") or {})
        return env

    def op_run(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            done = subprocess.run(request["argv"], env=self._env(request),
                                  cwd=request.get("cwd"), capture_output=True,
                                  input=(request.get("input") or "").encode(),
                                  timeout=request.get("timeout"))
        except subprocess.TimeoutExpired as e:
            return {"rc": None, "timed_out": True,
                    "stdout": (e.stdout or b"").decode(errors="replace"),
                    "stderr": (e.stderr or b"").decode(errors="replace")}
        return {"rc": done.returncode, "stdout": done.stdout.decode(errors="replace"),
                "stderr": done.stderr.decode(errors="replace")}

    def op_spawn(self, request: dict[str, Any]) -> dict[str, Any]:
        with open(request["stdout"], "wb") as out, open(request["stderr"], "wb") as err:
            child = subprocess.Popen(request["argv"], env=self._env(request),
                                     cwd=request.get("cwd"), stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=err)
        self.children[child.pid] = child
        return {"pid": child.pid}

    def op_wait(self, request: dict[str, Any]) -> dict[str, Any]:
        child = self.children[request["pid"]]
        try:
            return {"rc": child.wait(timeout=request.get("timeout"))}
        except subprocess.TimeoutExpired:
            return {"rc": None}

    def op_signal(self, request: dict[str, Any]) -> dict[str, Any]:
        self.children[request["pid"]].send_signal(getattr(signal, request["signal"]))
        return {"ok": True}


if __name__ == "__main__":
    Agent(sys.argv[1] if len(sys.argv) > 1 else find_port()).serve()
