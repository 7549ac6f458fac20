"""Drives opened, unmounted and powered off through udisks2, so that polkit decides, not sudo.

Without root, a desktop user cannot open /dev/sdX; udisks2 (root, on the system bus) can, and
asks polkit whether this caller may.  ``Block.OpenDevice`` hands back the open descriptor
itself over D-Bus, so everything after the open is the same engine as for root.  Which drives
may be written is still decided by :mod:`popsicle_py.plan` and :mod:`popsicle_py.drives`, from
the kernel's facts; udisks is only the opener here, and the drive is found by device number,
never by name.

polkit may want a password.  A desktop session has an agent that asks; in a terminal (ssh, a
text console) there is none, so, as ``udisksctl`` does, a refusal that can be overcome
(``NotAuthorizedCanObtain``) starts ``pkttyagent`` for this process on the terminal and the
call is made once more.  Every refusal becomes one line naming the drive.

D-Bus is spoken with jeepney: pure Python (no compiler, no GLib), small, and it passes unix
file descriptors, which is all OpenDevice needs.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import select
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from popsicle_py.udisks_alive import Heartbeat
from popsicle_py.udisks_replies import BLOCK as BLOCK
from popsicle_py.udisks_replies import ERROR as ERROR
from popsicle_py.udisks_replies import FILESYSTEM as FILESYSTEM
from popsicle_py.udisks_replies import BlockObject as BlockObject
from popsicle_py.udisks_replies import Objects, Props
from popsicle_py.udisks_replies import UdisksError as UdisksError
from popsicle_py.udisks_replies import block_for_devnum as block_for_devnum
from popsicle_py.udisks_replies import describe_refusal as describe_refusal

if TYPE_CHECKING:  # jeepney is imported on the first call: root never needs D-Bus
    from jeepney import Message
    from jeepney.io.blocking import DBusConnection

log = logging.getLogger(__name__)

BUS_NAME = "org.freedesktop.UDisks2"
ROOT_PATH = "/org/freedesktop/UDisks2"
DRIVE = "org.freedesktop.UDisks2.Drive"

#: A call that polkit may turn into a password prompt waits for the user, but in short steps,
#: so that a cancel is seen; a call that cannot prompt gives up after this.
POLL = 0.25
CALL_TIMEOUT = 25.0  # D-Bus' own default
#: While a call waits for a password, how often udisks2 and polkit are asked whether they are
#: still there (see :mod:`popsicle_py.udisks_alive`).
PROBE_EVERY = 5.0
AGENT_START_TIMEOUT = 10.0

Body = tuple[Any, ...]  # a D-Bus message's body, as jeepney gives it

#: udisks' option (false is its default, said anyway): polkit may ask the user for a password.
INTERACTIVE: Props = {"auth.no_user_interaction": ("b", False)}

NEEDS_ROOT = ("writing drives needs root: run with sudo, or install udisks2 so popsicle-py "
              "can ask for permission")
NEEDS_ROOT_TO_READ = ("reading drives needs root: run with sudo, or install udisks2 so "
                      "popsicle-py can ask for permission")
LOST = ("the system bus went away during the run, so this user's drives cannot be opened "
        "through udisks2: run with sudo, or try again once it is back")
BUS_HUNG = ("the system bus (dbus-daemon) did not answer, so this user's drives cannot be "
            "opened through udisks2: run with sudo, or restart it")


def hung_words(limit: float) -> str:
    """Why nothing can be opened: udisks2 is there but did not answer within ``limit`` s."""
    return (f"udisks2 did not answer within {limit:g} s, so this user's drives cannot be "
            "opened through it: run with sudo, or restart udisks2")


class Unavailable(Exception):
    """No system bus, or no udisks2 daemon on it; ``words``: what the user reads when that
    is not "install udisks2" (it hung, the bus hung or went away), else None."""

    def __init__(self, why: str, *, words: str | None = None) -> None:
        super().__init__(why)
        self.words = words


# --------------------------------------------------------------------------------------------
# The bus (I/O)


class Client:
    """One connection to udisks2 on the system bus."""

    def __init__(self, connection: DBusConnection) -> None:
        self.connection = connection
        self._agent: subprocess.Popen[bytes] | None = None
        self._agent_lock = threading.Lock()
        # Our one text agent asks one password at a time, and polkit refuses a call that
        # comes while it asks for another (two sticks plugged in together): a refused call
        # retries once no other is in flight (any may be at the prompt), one at a time.
        self._turns = threading.Condition()
        self._calls = 0
        self._retrying = False
        # Lanes call from their own threads over this one connection: sends are serialised,
        # and one caller at a time receives, filing every reply by serial for its caller.
        # No lock is held across a call, so a password prompt never stops the others.
        self._send_lock = threading.Lock()
        self._filed = threading.Condition()
        self._receiving = False
        self._replies: dict[int, Message] = {}
        self._abandoned: set[int] = set()
        self.broken = False  # the bus connection broke: not to be used again

    @classmethod
    def connect(cls) -> Client:
        """Connect, and check that udisks2 answers (it may be started on demand)."""
        from jeepney.io.blocking import open_dbus_connection

        try:
            connection = open_dbus_connection(bus="SYSTEM", enable_fds=True)
        except TimeoutError as exc:  # it took the connection and said nothing: frozen
            raise Unavailable(f"the system bus does not answer: {exc}", words=BUS_HUNG) from None
        except (OSError, ValueError, KeyError) as exc:
            raise Unavailable(f"no system bus: {exc}") from None
        client = cls(connection)
        try:
            client.managed_objects()
        except (UdisksError, TimeoutError) as exc:
            connection.close()
            hung = isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT
            raise Unavailable(f"udisks2 does not answer: {exc}",
                              words=hung_words(_limit) if hung else None) from None
        return client

    def close(self) -> None:
        self.stop_agent()
        self.connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Calls.
    def call(self, path: str, interface: str, method: str, signature: str = "",
             body: Body = (), *, interactive: bool = False,
             cancel: Callable[[], bool] | None = None, what: str = "use",
             shown: str = "") -> Body:
        """A method call on udisks; raises :class:`UdisksError` with one line.

        An interactive call may wait for a password as long as the user takes; it is polled
        every :data:`POLL` seconds so that ``cancel()`` ends the wait, and ends when udisks2
        or polkit stops answering meanwhile (:mod:`popsicle_py.udisks_alive`).
        """
        from jeepney import DBusAddress, new_method_call
        from jeepney.low_level import MessageFlag

        cancel = cancel or _cancel
        address = DBusAddress(path, BUS_NAME, interface)
        message = new_method_call(address, method, signature or None, body)
        if interactive:
            message.header.flags |= MessageFlag.allow_interactive_authorization
        serial = self._send(message, shown or path)
        limit = _limit
        deadline = None if interactive else time.monotonic() + limit
        # No time limit for a password, but one for a daemon that stopped answering.
        alive = Heartbeat(lambda m: self._send(m, shown or path), self._answered, self._abandon,
                          every=min(PROBE_EVERY, limit), limit=limit) if interactive else None
        try:
            reply = self._reply(serial, deadline, cancel, shown or path, alive, limit)
        except BaseException:
            self._abandon(serial)
            raise
        finally:
            if alive is not None:
                alive.close()
        return _unwrap(reply, what, shown or path)

    def _send(self, message: Message, shown: str) -> int:
        with self._send_lock:
            serial: int = next(self.connection.outgoing_serial)
            try:
                self.connection.send(message, serial=serial)
            except OSError as exc:
                raise self._lost(exc, shown) from None
        return serial

    def _lost(self, exc: OSError, shown: str) -> UdisksError:
        """The bus connection broke (dbus-daemon gone): said as that, not as the drive's
        fault; :func:`client` connects anew for the next drive."""
        self.broken = True
        return UdisksError(errno.ECONNRESET, f"{shown}: the connection to udisks2 was lost "
                           f"(the system bus went away: {exc.strerror or exc})")

    def _answered(self, serial: int) -> bool:
        """True once the reply to ``serial`` came (taken: a probe's answer, see udisks_alive)."""
        with self._filed:
            reply = self._replies.pop(serial, None)
        if reply is not None:
            _close_descriptors(reply.body)
        return reply is not None

    def _reply(self, serial: int, deadline: float | None, cancel: Callable[[], bool] | None,
               shown: str, alive: Heartbeat | None = None,
               limit: float = CALL_TIMEOUT) -> Message:
        """The reply to ``serial``: filed by whichever caller was receiving, or received here
        when nobody is; cancel, deadline and ``alive`` are looked at every :data:`POLL` s."""
        while True:
            if cancel is not None and cancel():
                raise UdisksError(errno.EINTR, f"{shown}: cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise UdisksError(errno.ETIMEDOUT, f"{shown}: udisks2 did not answer "
                                  f"within {limit:g} s")
            hung = alive.hung() if alive is not None else None
            if hung is not None:
                raise UdisksError(errno.ETIMEDOUT, f"{shown}: {hung} stopped answering (nothing "
                                  f"for {limit:g} s): restart it, or run with sudo")
            with self._filed:
                reply = self._replies.pop(serial, None)
                if reply is not None:
                    return reply
                if self._receiving:
                    self._filed.wait(POLL)
                    continue
                self._receiving = True
            message: Message | None = None
            try:
                message = self.connection.receive(timeout=POLL)
            except TimeoutError:
                pass
            except OSError as exc:
                raise self._lost(exc, shown) from None
            finally:
                with self._filed:
                    self._receiving = False
                    if message is not None:
                        self._file(message)
                    self._filed.notify_all()

    def _file(self, message: Message) -> None:
        """Keep a reply for its caller (the lock held); signals and abandoned replies go."""
        from jeepney import HeaderFields

        serial = message.header.fields.get(HeaderFields.reply_serial)
        if not isinstance(serial, int):
            return
        if serial in self._abandoned:
            self._abandoned.discard(serial)
            _close_descriptors(message.body)
        else:
            self._replies[serial] = message

    def _abandon(self, serial: int) -> None:
        """A call given up (cancel, time limit): its reply, if it comes, is dropped (an open
        descriptor in it closed)."""
        with self._filed:
            reply = self._replies.pop(serial, None)
            if reply is None:
                self._abandoned.add(serial)
            else:
                _close_descriptors(reply.body)

    def managed_objects(self) -> Objects:
        body = self.call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
                         what="list drives with", shown="udisks2")
        objects: Objects = body[0]
        return objects

    def block(self, devnum: int, shown: str) -> BlockObject:
        found = block_for_devnum(self.managed_objects(), devnum)
        if found is None:
            raise UdisksError(errno.ENODEV, f"{shown}: udisks2 does not know this drive")
        return found

    def _with_agent(self, attempt: Callable[[], Body],
                    cancel: Callable[[], bool] | None = None) -> Body:
        """Run a call; if polkit wants a password and nobody can ask, start a text agent
        on the terminal (if there is one) and run it once more, in turn (see __init__).

        With no agent at all it is run once more anyway: polkit answers "password" for what
        a rule allows when it could not apply the rule (one that took too long on a busy
        machine, or udisksd passing the call without the drive's details), and a station
        must not fail a stick for that.  A real refusal says the same twice."""
        try:
            return self._counted(attempt)
        except UdisksError as exc:
            if not exc.name.endswith("NotAuthorizedCanObtain"):
                raise
            with self._agent_lock:  # lanes refused together start one agent, and all retry
                alive = self._agent is not None and self._agent.poll() is None
                asking = alive or self.start_agent()
            if not asking:
                return self._counted(attempt)
        stop = cancel or _cancel
        with self._turns:
            while self._calls or self._retrying:
                if stop is not None and stop():
                    raise UdisksError(errno.EINTR, "cancelled while another drive's password "
                                      "was asked for")
                self._turns.wait(POLL)
            self._retrying = True
        try:
            return self._counted(attempt)
        finally:
            with self._turns:
                self._retrying = False
                self._turns.notify_all()

    def _counted(self, attempt: Callable[[], Body]) -> Body:
        """``attempt()``, counted among the calls in flight."""
        with self._turns:
            self._calls += 1
        try:
            return attempt()
        finally:
            with self._turns:
                self._calls -= 1
                self._turns.notify_all()

    def open_device(self, devnum: int, mode: str, flags: int, shown: str, *,
                    cancel: Callable[[], bool] | None = None) -> int:
        """Block.OpenDevice: the descriptor udisks opened for us (ours to close)."""
        block = self.block(devnum, shown)
        options = {"flags": ("i", flags), **INTERACTIVE}

        def attempt() -> Body:
            return self.call(block.object_path, BLOCK, "OpenDevice", "sa{sv}",
                             (mode, options), interactive=True, cancel=cancel, what="open",
                             shown=shown)

        handle = self._with_agent(attempt, cancel)[0]
        fd: int = handle.to_raw_fd()
        try:
            st = os.fstat(fd)
        except OSError:
            st = None
        if st is None or not stat.S_ISBLK(st.st_mode) or st.st_rdev != devnum:
            # udisks opened something else than the drive we chose by number: never write it.
            os.close(fd)
            raise UdisksError(errno.ENXIO, f"{shown}: udisks2 opened another device than "
                              "the one selected; nothing was written to it")
        return fd

    def unmount(self, devnum: int, shown: str, *,
                cancel: Callable[[], bool] | None = None) -> None:
        """Filesystem.Unmount of one mounted block device (a partition, usually)."""
        block = self.block(devnum, shown)

        def attempt() -> Body:
            return self.call(block.object_path, FILESYSTEM, "Unmount", "a{sv}", (INTERACTIVE,),
                             interactive=True, cancel=cancel, what="unmount", shown=shown)

        self._with_agent(attempt, cancel)

    def power_off(self, devnum: int, shown: str, *,
                  cancel: Callable[[], bool] | None = None) -> None:
        """Drive.PowerOff of the drive holding the block device ``devnum``."""
        block = self.block(devnum, shown)
        if block.drive in ("", "/"):
            raise UdisksError(errno.ENODEV, f"{shown}: udisks2 knows no drive to power off")

        def attempt() -> Body:
            return self.call(block.drive, DRIVE, "PowerOff", "a{sv}", (INTERACTIVE,),
                             interactive=True, cancel=cancel, what="power off", shown=shown)

        self._with_agent(attempt, cancel)

    # The text agent.
    def start_agent(self) -> bool:
        """Start pkttyagent for this process on the controlling terminal; True once it is
        registered.  False without a terminal or without pkttyagent (polkit's refusal stands).
        """
        if self._agent is not None:
            return False  # it is running and polkit still refused: do not ask again
        program = shutil.which("pkttyagent")
        if program is None or not _has_terminal():
            return False
        read, write = os.pipe()
        try:
            self._agent = subprocess.Popen(
                # Not --fallback: polkit uses a fallback agent only for a subject in a login
                # session it knows (get_authentication_agent_for_subject), and we only get
                # here when no agent could ask, so there is no other agent to defer to.
                [program, "--process", str(os.getpid()), "--notify-fd", str(write)],
                pass_fds=(write,), stdin=None, stdout=None, stderr=None)
        except OSError as exc:
            log.debug("pkttyagent not started: %s", exc)
            os.close(read)
            return False
        finally:
            os.close(write)
        try:
            # pkttyagent closes the descriptor once it is registered with polkit.
            ready, _, _ = select.select([read], [], [], AGENT_START_TIMEOUT)
            registered = bool(ready) and self._agent.poll() is None
        finally:
            os.close(read)
        if not registered:
            log.debug("pkttyagent did not register")
            self.stop_agent()
        return registered

    def stop_agent(self) -> None:
        agent, self._agent = self._agent, None
        if agent is None:
            return
        with contextlib.suppress(ProcessLookupError):
            agent.terminate()
        try:
            agent.wait(2)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def _unwrap(reply: Message, what: str, shown: str) -> Body:
    from jeepney import HeaderFields, MessageType

    if reply.header.message_type == MessageType.error:
        name = str(reply.header.fields.get(HeaderFields.error_name, ""))
        message = str(reply.body[0]) if reply.body else name
        if name.endswith((".ServiceUnknown", ".NameHasNoOwner", ".NoReply")):
            raise UdisksError(errno.ENOENT, f"udisks2 is not running ({message})", name)
        raise describe_refusal(name, message, what, shown)
    body: Body = reply.body
    return body


def _close_descriptors(body: Body) -> None:
    """Close the descriptors udisks sent in a reply nobody takes (OpenDevice's handle)."""
    from jeepney import FileDescriptor

    for value in body:
        if isinstance(value, FileDescriptor):
            with contextlib.suppress(OSError):
                value.close()


def _has_terminal() -> bool:
    """True when this process has a controlling terminal a text agent can prompt on."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


# --------------------------------------------------------------------------------------------
# The process's one client


_client: Client | None = None
_unavailable: Unavailable | None = None
_cancel: Callable[[], bool] | None = None
_limit = CALL_TIMEOUT
_connecting = threading.Lock()
#: A daemon's answer may take this long on a loaded machine: a shorter --stall-timeout is not
#: taken for udisks2 and polkit.
LIMIT_FLOOR = 1.0


def set_cancel(check: Callable[[], bool] | None) -> None:
    """Calls waiting for polkit (a password prompt) end when ``check()`` turns true (Ctrl-C)."""
    global _cancel
    _cancel = check


def set_limit(seconds: float | None) -> None:
    """udisks2 or polkit silent for ``seconds`` (the run's ``--stall-timeout``) fails the call,
    when that is shorter than D-Bus' 25 s: a user who asked that a hung drive be failed in 5 s
    is not held 25 s by a hung daemon.  None: D-Bus' own 25 s."""
    global _limit
    _limit = CALL_TIMEOUT if seconds is None else max(LIMIT_FLOOR, min(CALL_TIMEOUT, seconds))


def client() -> Client:
    """The shared client; raises :class:`Unavailable` (remembered) when udisks is not there."""
    global _client, _unavailable
    with _connecting:  # lanes asking at once share one connection
        lost = _client is not None and _client.broken
        if _client is not None and lost:  # the bus went away: connect anew (it may be back)
            with contextlib.suppress(OSError):
                _client.close()
            _client = None
        if _client is not None:
            return _client
        if _unavailable is not None:
            raise Unavailable(str(_unavailable), words=_unavailable.words)
        try:
            _client = Client.connect()
        except Unavailable as exc:
            if lost:  # not remembered: a session may find the bus back for its next drive
                raise Unavailable(str(exc), words=exc.words or LOST) from None
            _unavailable = exc
            log.debug("udisks2 not used: %s", exc)
            raise
        atexit.register(close)  # a text agent we start must not outlive us
        return _client


def available() -> bool:
    """True when udisks2 answers on the system bus."""
    try:
        client()
    except Unavailable:
        return False
    return True


def unavailable_line(*, writing: bool) -> str | None:
    """Why this user cannot have drives opened by udisks2, one line; None when it answers."""
    try:
        client()
    except Unavailable as exc:
        return unavailable_words(exc, writing=writing)
    return None


def unavailable_words(exc: Unavailable, *, writing: bool) -> str:
    """The one line for ``exc``: install udisks2, or it hung, or the bus went away."""
    if exc.words is not None:
        return exc.words
    return NEEDS_ROOT if writing else NEEDS_ROOT_TO_READ


def close() -> None:
    """Drop the connection and stop a text agent we started."""
    global _client
    current, _client = _client, None
    if current is not None:
        current.close()


def _devnum(path: str) -> int:
    return os.stat(path).st_rdev


def open_device(path: str, mode: str, flags: int) -> int:
    """The descriptor of the block device at ``path``, opened by udisks2 ("r", "w" or "rw").

    ``flags`` are extra open(2) flags (O_EXCL, O_DIRECT, O_SYNC...), never the access mode.
    Raises :class:`Unavailable` or :class:`UdisksError` (an OSError with one line).
    """
    return client().open_device(_devnum(path), mode, flags, path)


def unmount(path: str) -> None:
    """Unmount the filesystem on the block device at ``path`` (a partition, usually)."""
    client().unmount(_devnum(path), path)


def power_off(path: str) -> str | None:
    """Power off the drive holding ``path``; None when done, else why not (one line)."""
    try:
        client().power_off(_devnum(path), path)
    except (Unavailable, OSError) as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Close the shared client (and its text agent) at the end of a command."""
    try:
        yield
    finally:
        close()
