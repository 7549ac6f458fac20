"""How a command ends: one line per problem on stderr, the exit status it means, and for
scripts that asked for JSON a last ``summary`` line even when nothing ran."""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from popsicle_py import events
from popsicle_py.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    InterruptedWhileHung,
    PopsicleError,
)

if TYPE_CHECKING:
    from popsicle_py.signals import Cancellation


def _keep_hyphenated_words() -> None:
    """Help text never breaks ``popsicle-py`` or ``50-popsicle-py.rules`` at a hyphen: a
    command copied from the help must work.  Click wraps with textwrap, which would."""
    from click import _textwrap

    class Wrapper(_textwrap.TextWrapper):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("break_on_hyphens", False)
            kwargs.setdefault("break_long_words", False)  # a long path overflows, unbroken
            super().__init__(*args, **kwargs)

    _textwrap.TextWrapper = Wrapper  # type: ignore[misc]  # click.formatting looks it up per call


_keep_hyphenated_words()


def exit_at_once(code: object) -> NoReturn:
    """Exit with ``code`` (a ``SystemExit``'s) without tearing every module down first.

    The teardown does nothing a user needs (the drives are closed, the report file too) and
    costs about 20 ms of CPU after the last drive is done, 0.05 to 0.25 s of wall time with 32
    drives on a loaded machine.  Exit handlers still run and the output is flushed, as at any
    exit; while another thread is still alive (a drive's call that has not returned), or under
    a profiler or tracer that reports after the program ends, the exit is the interpreter's own.
    """
    import atexit
    import os
    import threading

    if threading.active_count() > 1 or sys.getprofile() or sys.gettrace():
        sys.exit(code)  # type: ignore[arg-type]  # any SystemExit code, passed on as it came
    if code is None or isinstance(code, int):
        status = code or 0
    else:
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a reader that left: the exit status still tells
            status = status or 120  # what the interpreter says when its own flush fails
    os._exit(status)


def error(line: str) -> None:
    """``popsicle-py: LINE`` on stderr, one line whatever a name in it holds (an escape
    sequence, a newline, a byte that is not UTF-8: see :func:`~popsicle_py.view_json.printable`);
    a closed or full stderr is no reason to fail: the exit status says it."""
    from popsicle_py.view_json import printable

    with contextlib.suppress(OSError, ValueError):
        click.echo(f"{PROG}: {printable(line)}", err=True)


def show(exc: PopsicleError) -> None:
    """An error of ours, a line per problem, as :func:`error` says them."""
    for line in exc.messages():
        error(line)


def json_refusal(lines: Sequence[str]) -> None:
    """A script asked for JSON: its last line is a summary, even when nothing ran."""
    from popsicle_py.view_json import JsonView

    view = JsonView()
    for line in lines:
        view.handle(events.Error(line))
    view.handle(events.Summary())
    view.close()


def _forgiving_output() -> None:
    """A character the locale cannot encode (a name in Chinese under ISO-8859-1) is written as
    its escape, as Python writes stderr: it failed the write, which crashed the live view
    and silenced every later line of a log."""
    import io

    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="backslashreplace")


class SignalledBeforeRun(KeyboardInterrupt):
    """SIGTERM or SIGHUP before the run handles signals (the plan, the question): the
    command ends as Ctrl-C does there, saying so (with --json, its summary last)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_before_run(signum: int, frame: object) -> None:
    raise SignalledBeforeRun(signum)


def _hear_stops_before_run() -> None:
    """SIGTERM and SIGHUP raise, as SIGINT does, until the run's own handlers take over
    (:func:`running`); by default they killed the process at the question with no word and,
    for a script, no summary.  An ignored one (``nohup``) stays ignored."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread: leave it
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _stop_before_run)


@contextlib.contextmanager
def running(cancel: Cancellation) -> Iterator[None]:
    """The run's signals are ``cancel``'s (the first stops the drives, a second quits).  Once
    the run is over, its summary said, a signal ends the process as signals do, with nothing
    more said: "interrupted before writing" and an empty summary would be false then."""
    try:
        with cancel.installed():
            yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    signal.signal(signum, signal.SIG_DFL)


def _stopped_by(exc: BaseException) -> SignalledBeforeRun | None:
    """The SIGTERM or SIGHUP behind ``exc`` (click turns it into Abort at the prompt)."""
    for cause in (exc, exc.__context__):
        if isinstance(cause, SignalledBeforeRun):
            return cause
    return None


def run_guarded(debug: bool, as_json: bool, body: Callable[[], int]) -> NoReturn:
    """Run a command body; errors of ours show themselves and carry their exit status."""
    import logging  # here, not at the top: --help and --version do not log

    _forgiving_output()
    _hear_stops_before_run()
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format=f"{PROG}: %(message)s")
    try:
        status = body()
    except PopsicleError as exc:
        show(exc)
        if as_json:
            json_refusal(exc.messages())
        status = exc.exit_code
    except (KeyboardInterrupt, click.Abort) as exc:
        # Ctrl-C (also at the prompt, which click turns into Abort) is a SIGINT: 130.
        # End of input at the prompt is an unanswered question: refused, 2.
        # SIGTERM or SIGHUP before the run: 128 + its number, as the run would say.
        interrupted = isinstance(exc, KeyboardInterrupt) or isinstance(
            exc.__context__, KeyboardInterrupt)
        stopped = _stopped_by(exc)
        if stopped is not None:
            error(f"{signal.Signals(stopped.signum).name}: stopped before writing: "
                  "nothing was written")
        else:
            error("interrupted before writing: nothing was written" if interrupted
                  else "no answer at the confirmation: nothing was written")
        if isinstance(exc, InterruptedWhileHung):
            error(exc.note)
        if as_json:
            json_refusal([])
        status = (128 + stopped.signum if stopped is not None
                  else 130 if interrupted else EXIT_USAGE)
    except click.exceptions.Exit:
        raise
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc()
        said = str(exc) or type(exc).__name__  # a MemoryError says nothing of itself
        error(f"unexpected error: {said} (run with --debug to see where)")
        if as_json:  # a script's last line is a summary; this one says nothing went right
            json_refusal([f"unexpected error: {said}"])
        status = EXIT_FAILED
    sys.exit(status)


class DocumentCommand(click.Command):
    """A command whose ``--json`` is one JSON document (``list``'s array), not events: a
    refusal or usage error leaves stdout empty (the line on stderr, the exit status say
    it), as an ``error`` event and a summary are no array, and ``[]`` would be a false
    "none"."""


class Group(click.Group):
    """Click's group, with usage errors on one line (``popsicle-py: what; see --help``), and
    every command's whole first sentence in ``--help`` (click cuts it at the terminal's width).
    """

    group_class = type  # subgroups (``cache``) are Groups too

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, command.get_short_help_str(limit=1000))
                for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: bare command
                exc.show()
                sys.exit(exc.exit_code)
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            message = " ".join(exc.format_message().split())
            error(message + hint)
            document = exc.ctx is not None and isinstance(exc.ctx.command, DocumentCommand)
            if "--json" in (sys.argv[1:] if args is None else list(args)) and not document:
                json_refusal([message])  # a script's last line is a summary, even for a typo
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            error(" ".join(exc.format_message().split()))
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            if isinstance(exc.__cause__, KeyboardInterrupt):  # Ctrl-C while click parsed
                error("interrupted before writing: nothing was written")
                sys.exit(130)
            error("aborted")
            sys.exit(EXIT_FAILED)
        except OSError as exc:  # --help or --version to a full disk: one line, not a traceback
            if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT):
                raise
            error(f"cannot write the output ({exc.strerror or exc})")
            sys.exit(EXIT_FAILED)
        sys.exit(status if isinstance(status, int) else EXIT_OK)
