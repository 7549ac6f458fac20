"""`python -m popsicle_py` runs the same command as the `popsicle-py` script."""

from popsicle_py.cli import main

if __name__ == "__main__":
    main(prog_name="popsicle-py")
