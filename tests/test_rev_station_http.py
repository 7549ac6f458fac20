"""The station's HTTP API against a web page of another site: on a loopback --listen, a
request addressed to another name (DNS rebinding: the attacker's name pointed at 127.0.0.1)
reads nothing, posts nothing; the station's own addresses are answered as before."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
from pathlib import Path

from conftest import popsicle_cmd

MiB = 1 << 20


def ask(port: int, method: str, path: str, host: str,
        token: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host, **({"Authorization": f"Bearer {token}"} if token else {})}
    conn.request(method, path, headers=headers, body=b"" if method == "POST" else None)
    response = conn.getresponse()
    answer = response.status, response.read()
    conn.close()
    return answer


def test_a_page_of_another_site_rebound_to_the_loopback_reads_and_stops_nothing(
        tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(MiB))
    proc = subprocess.Popen(
        [*popsicle_cmd(), "station", str(image), "--yes", "--force", "--listen", "127.0.0.1:0",
         "--journal", str(tmp_path / "journal.sqlite"), "--operator", "ada"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = token = ""
        for line in proc.stdout:
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            url = found.group(1) if found else url
            if line.startswith("token for POST requests: "):
                token = line.split(": ", 1)[1].split()[0]
            if line.startswith("watching"):
                break
        port = int(url)
        for evil in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                     "localhost.evil.example:80"):
            for path in ("/api/records", "/api/slots", "/api/records?format=csv", "/"):
                status, body = ask(port, "GET", path, evil)
                assert status == 421, (evil, path, status)
                assert b"ada" not in body and b"loopback" in body
            assert ask(port, "POST", "/api/stop", evil, token)[0] == 421
        for own in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                    "127.0.0.2"):
            status, body = ask(port, "GET", "/api/slots", own)
            assert status == 200 and json.loads(body)["station"]["operator"] == "ada", own
        assert proc.poll() is None, "a POST from another name stopped the station"
        assert ask(port, "POST", "/api/stop", f"127.0.0.1:{port}", token)[0] == 202
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(20)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_a_stop_through_the_api_is_said_on_the_terminal(tmp_path: Path) -> None:
    """The station ended on POST /api/stop and its terminal said only "no drive was
    written": the operator there could not tell why.  Now the stop is said, once."""
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(MiB))
    proc = subprocess.Popen(
        [*popsicle_cmd(), "station", str(image), "--yes", "--force", "--listen", "127.0.0.1:0",
         "--journal", str(tmp_path / "journal.sqlite")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port, token = 0, ""
    for line in proc.stdout:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        port = int(found.group(1)) if found else port
        if line.startswith("token for POST requests: "):
            token = line.split(": ", 1)[1].split()[0]
        if line.startswith("watching"):
            break
    for _ in range(2):
        assert ask(port, "POST", "/api/stop", f"127.0.0.1:{port}", token)[0] == 202
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    said = [line for line in err.splitlines() if "POST /api/stop" in line]
    assert said == ["popsicle-py: stop asked for (POST /api/stop): no drive is being "
                    "written, ending now"], err


def test_a_batch_started_again_counts_to_its_count_beyond_what_it_had(tmp_path: Path) -> None:
    """The page's counters are the batch's (the journal's, across restarts), and its target
    was --count alone: a batch of 2 started again with --count 3 showed "2 of 3", then "3 of
    3" with two drives still to come.  The target is now 2 + 3."""
    from popsicle_py.station.journal import Journal

    journal = tmp_path / "journal.sqlite"
    earlier = Journal(str(journal), station="s", session="before", batch="b1")
    for result in ("ok", "failed"):
        earlier.finish(earlier.start("A1", {"seq": 1, "device": "/dev/sdc"}),
                       {"result": result})
    earlier.close()
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(MiB))
    proc = subprocess.Popen(
        [*popsicle_cmd(), "station", str(image), "--yes", "--force", "--listen", "127.0.0.1:0",
         "--journal", str(journal), "--batch", "b1", "--count", "3"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = 0
        for line in proc.stdout:
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            port = int(found.group(1)) if found else port
            if line.startswith("watching"):
                break
        status, body = ask(port, "GET", "/api/slots", f"127.0.0.1:{port}")
        assert status == 200, body
        counters = json.loads(body)["counters"]
        assert (counters["total"], counters["target"]) == (2, 5), counters
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
