"""Asking the system without hanging: a question that may never be answered (a stat() on a
hung network or FUSE share, which Ctrl-C does not interrupt) is asked on a thread of its own,
and waited for a bounded time by the thread that asked, which stays free to hear Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
K = TypeVar("K")
log = logging.getLogger(__name__)

#: Seconds a mount's source path (or an overlay's layers) is given to answer a stat().
ASK_SOURCES = 2.0

_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def start_quiet(target: Callable[..., None], *args: object, name: str) -> None:
    """Start a daemon thread with the stop signals blocked, which it keeps: one left blocked
    in the kernel (a hung share, a dying drive) must never be the thread a Ctrl-C is
    delivered to, where it would wait unseen while the main thread waits for it."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def in_time(call: Callable[[], T], otherwise: T, timeout: float = ASK_SOURCES) -> T:
    """``call()`` on a thread of its own (see :func:`start_quiet`), given ``timeout``;
    ``otherwise`` when it has not returned by then (it is left to finish, or never)."""
    answer: list[T] = []
    done = threading.Event()

    def run() -> None:
        try:
            answer.append(call())
        except Exception:  # as unanswered (``otherwise``), never a thread's traceback
            log.debug("%s failed", call, exc_info=True)
        finally:
            done.set()

    start_quiet(run, name="popsicle-in-time")
    return answer[0] if done.wait(timeout) and answer else otherwise


def ask_each(items: Iterable[K], question: Callable[[K], T], timeout: float,
             name: str) -> dict[K, T]:
    """``question(item)`` of each item, each on a thread of its own, all within one
    ``timeout``: the answers that came.  One that does not come (a hung share) is left out,
    hides no other, and is never waited for again: many hung items cost no more than one."""
    answers: dict[K, T] = {}
    lock = threading.Lock()
    all_done = threading.Event()
    waiting = set(items)

    def ask(item: K) -> None:
        answer = question(item)
        with lock:
            answers[item] = answer
            waiting.discard(item)
            if not waiting:
                all_done.set()

    for item in list(waiting):
        start_quiet(ask, item, name=name)
    if waiting:
        all_done.wait(timeout)
    with lock:
        return dict(answers)
