"""`python -m popsicle_py` runs the same command as the `popsicle-py` script."""

from popsicle_py.cli import main
from popsicle_py.cli.guard import exit_at_once


def run() -> None:
    """The `popsicle-py` program (the script's entry point): the command line, then the exit."""
    try:
        main(prog_name="popsicle-py")
    except SystemExit as exc:
        exit_at_once(exc.code)


if __name__ == "__main__":
    run()
