"""``popsicle-py check``: does a drive hold what its certificate (or a published SHA-256)
says?  Options in, a :class:`~popsicle_py.app.check.CheckRequest` out; exit 0 it matches,
1 it differs, 2 the certificate or its signature is not valid (or the input is refused)."""

from __future__ import annotations

import os
from typing import Any

import click

from popsicle_py.cli.guard import run_guarded, running
from popsicle_py.cli.options import SIZE, OutputOptions, output_options, stall_timeout_option
from popsicle_py.errors import Refused


class _FileName(click.Path):
    """A file's name, completed as a file's, but not looked at here: the app reads it on a
    thread of its own (click.Path's stat() of a name on a hung share held the command for
    ever, Ctrl-C unheard, before it began)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        return os.fsdecode(value)


FILE = _FileName(path_type=str)


@click.command(name="check")
@click.argument("args", nargs=-1, required=True, metavar="[CERT] DEVICE...")
@click.option("--allowed-signers", type=FILE, metavar="FILE",
              help="ssh-keygen's allowed_signers: CERT must be signed (CERT.sig) by one of "
                   "them.")
@click.option("--sha256", metavar="HEX",
              help="Judge each DEVICE against this published SHA-256 of the image (no CERT).")
@click.option("--sums", nargs=2, type=(FILE, str), metavar="SHA256SUMS NAME",
              help="Take the SHA-256 of NAME from a SHA256SUMS file (no CERT).")
@click.option("--size", type=SIZE, help="The image's size in bytes, with --sha256 or --sums.")
@stall_timeout_option("Fail a drive whose reads make no progress for SECONDS.")
@output_options()
def check(args: tuple[str, ...], allowed_signers: str | None, sha256: str | None,
          sums: tuple[str, str] | None, size: int | None, stall_timeout: float,
          output: OutputOptions) -> None:
    """Re-read DEVICE and compare it with CERT (a certificate of --certificate), without
    the image; or each DEVICE with a published --sha256 or --sums and --size.

    Nothing is written. Exit 0 when every drive matches, 1 when one differs (the first
    differing chunk is named), 2 when the certificate or its signature is not valid.
    """

    def body() -> int:
        from popsicle_py.app.check import CheckRequest, prepare_check
        from popsicle_py.app.common import exit_status
        from popsicle_py.cli.ask import make_view
        from popsicle_py.cli.hangup import HangUpView
        from popsicle_py.signals import Cancellation

        published = sha256 is not None or sums is not None
        if not published and len(args) < 2:
            raise Refused(["give a CERT and a DEVICE (or --sha256 HEX --size N DEVICE...)"])
        cert, devices = (None, args) if published else (args[0], args[1:])
        job = prepare_check(CheckRequest(devices, cert, allowed_signers, sha256, size, sums,
                                         stall_timeout))
        view = make_view(output.json, job.labels, writes=False)
        cancel = Cancellation()
        cancel.announce = view.announce
        with running(cancel):
            summary = job.run(HangUpView(view), cancel)  # a terminal gone: its output only
        return exit_status(summary, cancel)

    run_guarded(output.debug, output.json, body)
