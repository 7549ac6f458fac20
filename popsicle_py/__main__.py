"""`python -m popsicle_py` runs the same command as the `popsicle-py` script."""

import sys


def run() -> None:
    """The `popsicle-py` program (the script's entry point): the command line, then the exit.

    The imports are made here, not at the top: a Ctrl-C during them (the first tenth of a
    second) ends as one before the run does, in a line and 130, not in Python's traceback.
    """
    try:
        from popsicle_py.cli import main
        from popsicle_py.cli.guard import exit_at_once
    except KeyboardInterrupt:
        print("popsicle-py: interrupted before writing: nothing was written", file=sys.stderr)
        sys.exit(130)
    try:
        main(prog_name="popsicle-py")
    except SystemExit as exc:
        exit_at_once(exc.code)


if __name__ == "__main__":
    run()
