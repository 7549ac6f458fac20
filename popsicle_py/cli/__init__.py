"""The `popsicle-py` command line: options in, a request to the application layer, a view.

:mod:`~popsicle_py.cli.commands` holds the commands, :mod:`~popsicle_py.cli.options` the
option groups they share, :mod:`~popsicle_py.cli.ask` the confirmation and the views, and
:mod:`~popsicle_py.cli.guard` how a command ends (errors, exit status, JSON refusals).
"""

from popsicle_py.cli.commands import main

__all__ = ["main"]
