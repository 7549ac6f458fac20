"""The station's page in a real browser (Debian's chromium, through chromium-driver and
Selenium) while umockdev plugs and pulls sticks: the tiles follow plug, write, verify,
done and pull; a failed slot shows why; the page reconnects after the station restarts;
sixteen slots update at once; a card reader's second card in a slot is listed apart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import popsicle_cmd
from faulty import FaultyFile, faulty_files
from station_rig import MiB, Rig, slot_map
from test_watch import Stick, needs_testbed

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - CI installs it ('.[test]'); a skip there fails
    webdriver = None  # type: ignore[assignment]

needs_browser = pytest.mark.skipif(
    webdriver is None or not os.path.exists(CHROMIUM) or not shutil.which("chromedriver"),
    reason="needs selenium, and Debian's chromium and chromium-driver")
pytestmark = [needs_testbed, needs_browser, pytest.mark.umockdev]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "rig") as rig:
        yield rig


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--window-size=1920,1080"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or CHROMEDRIVER),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def rig_records(journal: Path) -> list[dict[str, Any]]:
    done = subprocess.run([*popsicle_cmd(), "records", "--journal", str(journal), "--json"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def tile(browser: Any, label: str) -> Any:
    return browser.find_element(By.CSS_SELECTOR, f'.tile[data-slot="{label}"]')


def until(browser: Any, what: str, check: Any, timeout: float = 30) -> Any:
    """Poll the page (Selenium's wait) until ``check`` holds; say what was awaited."""
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(check)
    except Exception as exc:
        body = browser.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"the page never showed {what}: {body!r}") from exc


def state_of(browser: Any, label: str) -> str:
    try:
        return str(tile(browser, label).get_attribute("data-state"))
    except Exception:  # re-rendered between the find and the read
        return ""


RECORD_STATES = """
window.seen = {};
const note = () => document.querySelectorAll('.tile').forEach(t => {
  const list = (window.seen[t.dataset.slot] = window.seen[t.dataset.slot] || []);
  if (list[list.length - 1] !== t.dataset.state) list.push(t.dataset.state);
});
note();
new MutationObserver(note).observe(document.getElementById('slots'), {childList: true});
"""


def test_tiles_follow_plug_write_verify_done_pull_and_a_failure_says_why(
        rig: Rig, browser: Any, tmp_path: Path) -> None:
    # The image crawls (a FUSE file, tests/faulty.py): each pass over it takes four seconds,
    # so the page has time to show writing and verifying, and a pull lands mid-write even on a
    # loaded machine (at one second a pass, a pull seen late found the drive done).
    data = os.urandom(8 * MiB)
    with faulty_files() as made:
        source = FaultyFile(len(data), content=data)
        made.append(source)
        slots = slot_map(tmp_path / "slots.toml", {"A": 2, "B": 3, "C": 5})
        args = [source.file, "--yes", "--force", "--slots", str(slots), "--journal",
                str(tmp_path / "j.sqlite"), "--listen", "127.0.0.1:0"]
        rig.start(args)
        source.set(crawl=(0, 2 * MiB))  # once its SHA-256 is read (the station watches)
        browser.get(rig.url)
        until(browser, "three empty slots in the map's order", lambda b: [
            (t.get_attribute("data-slot"), t.get_attribute("data-state"))
            for t in b.find_elements(By.CSS_SELECTOR, ".tile")] == [
            ("A", "empty"), ("B", "empty"), ("C", "empty")])
        assert browser.find_element(By.ID, "image").text == "disk (8.0 MiB)"
        browser.execute_script(RECORD_STATES)

        good, pulled = Stick("c", 3, 64 * MiB), Stick("d", 5, 64 * MiB)
        rig.add(good.description)
        until(browser, "slot B done", lambda b: (b.execute_script(
            "return window.seen.B") or [])[-1:] == ["done"])
        seen = browser.execute_script("return window.seen.B")
        # In this order; verifying may pass between two updates of the page on a busy machine
        # (only the image crawls, and verification reads the drive, not the image).
        order = ["empty", "probing", "writing", "verifying", "done"]
        assert seen == [state for state in order if state in seen], seen
        assert {"empty", "writing", "done"} <= set(seen), seen
        text = tile(browser, "B").text
        assert "DONE: PULL ME" in text.upper() and "SanDisk Cruzer Blade" in text
        assert browser.find_element(By.ID, "n-ok").text == "1"
        rig.wait(event="phase", device=good.dev, phase="done", detail="powered off")
        # Powered off, the kernel removes the disk (the stick still in the slot): the tile
        # still says "done: pull me" (checked once the page shows the next slot's failure).
        rig.remove(good.unplug)
        rig.wait(event="drive_removed", device=good.dev)

        rig.add(pulled.description)
        rig.wait(event="progress", device=pulled.dev, phase="writing")
        rig.remove(pulled.unplug)
        until(browser, "slot C failed", lambda b: state_of(b, "C") == "failed")
        assert "the drive was removed" in tile(browser, "C").text
        assert state_of(browser, "B") == "done"
        assert "DONE: PULL ME" in tile(browser, "B").text.upper()
        assert browser.find_element(By.ID, "n-failed").text == "1"

        # The station restarts: the page reconnects by itself and says so.  (Its SHA-256 of
        # the image, taken again, need not crawl: nothing is written from here on.)
        source.set(crawl=None)
        rig.kill()
        until(browser, "the connection lost", lambda b: "reconnecting" in b.find_element(
            By.ID, "connection").text)
        port = rig.url.rsplit(":", 1)[1].strip("/")
        rig.start([*args[:-1], f"127.0.0.1:{port}"])
        until(browser, "the restart banner", lambda b: "restarted" in b.find_element(
            By.ID, "banner").text)
        assert browser.find_element(By.ID, "connection").text == "live"
        assert rig.post("/api/stop")[0] == 202
        assert rig.wait_exit() == 0


def test_sixteen_slots_update_at_once(rig: Rig, browser: Any, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    path = tmp_path / "image.img"
    path.write_bytes(data)
    sticks = [Stick(chr(ord("b") + n), n + 1, 16 * MiB) for n in range(16)]
    slots = slot_map(tmp_path / "slots.toml", {str(n + 1): n + 1 for n in range(16)})
    rig.start([str(path), "--yes", "--slots", str(slots), "--journal",
               str(tmp_path / "j.sqlite"), "--listen", "127.0.0.1:0", "--no-power-off",
               "--count", "20"])
    browser.get(rig.url)
    until(browser, "sixteen empty slots", lambda b: len(b.find_elements(
        By.CSS_SELECTOR, '.tile[data-state="empty"]')) == 16)
    for stick in sticks:  # as fast as the station takes them (umockdev's socket is small)
        rig.add(stick.description)
        rig.wait(event="drive_added", device=stick.dev)
    until(browser, "sixteen slots done", lambda b: len(b.find_elements(
        By.CSS_SELECTOR, '.tile[data-state="done"]')) == 16, timeout=90)
    assert browser.find_element(By.ID, "n-ok").text == "16"
    assert browser.find_element(By.ID, "n-target").text == "of 20"
    state = rig.get("/api/slots")
    assert [s["label"] for s in state["slots"]] == [str(n) for n in range(1, 17)]
    assert {s["state"] for s in state["slots"]} == {"done"}
    metrics = rig.get("/metrics")
    assert 'popsicle_station_drives_total{result="ok"} 16.0' in metrics
    assert 'popsicle_station_slot_state{slot="7",state="done"} 1.0' in metrics
    rig.signal(signal.SIGTERM)  # a service's stop: nothing in flight, a clean exit
    assert rig.wait_exit() == 0
    rows = rig_records(tmp_path / "j.sqlite")
    assert sorted((r["slot"], r["result"]) for r in rows) == sorted(
        (str(n + 1), "ok") for n in range(16))
    for stick in sticks:
        assert rig.read(stick.dev)[: len(data)] == data  # type: ignore[index]


def test_a_second_card_in_a_slot_is_listed_apart_and_the_first_ones_failure_counts(
        rig: Rig, browser: Any, tmp_path: Path) -> None:
    from test_station import card_reader

    data = os.urandom(8 * MiB)
    usb = "/devices/pci0000:00/0000:00:14.0/usb1/1-4"
    with faulty_files() as made:
        source = FaultyFile(len(data), content=data)
        made.append(source)
        slots = slot_map(tmp_path / "slots.toml", {"A1": 4, "A2": 5})
        rig.start([source.file, "--yes", "--force", "--slots", str(slots), "--journal",
                   str(tmp_path / "j.sqlite"), "--listen", "127.0.0.1:0", "--no-power-off"])
        source.set(crawl=(0, MiB))  # once its SHA-256 is read (the station watches)
        browser.get(rig.url)
        until(browser, "two empty slots", lambda b: state_of(b, "A2") == "empty")
        rig.add(card_reader(4, {0: "e", 1: "f"}))
        rig.wait(event="progress", device="/dev/sde", phase="writing")
        until(browser, "slot A1 writing", lambda b: state_of(b, "A1") == "writing")
        assert "Card Reader 0" in tile(browser, "A1").text  # the first card, LUN 0
        until(browser, "the second card listed apart", lambda b: b.find_element(
            By.ID, "others-list").text == "/dev/sdf (port 1-4): slot A1 holds /dev/sde "
            "already: one drive per slot")
        rig.remove([f"/sys{usb}/1-4:1.0/host9/target9:0:0/9:0:0:0/block/sde"])
        until(browser, "slot A1 failed", lambda b: state_of(b, "A1") == "failed")
        assert "the drive was removed" in tile(browser, "A1").text
        assert browser.find_element(By.ID, "n-failed").text == "1"
        assert rig.post("/api/stop")[0] == 202
        assert rig.wait_exit() == 0
    assert rig.read("/dev/sdf") == b""
