"""`python -m ichbatch ...` is the `ichbatch` command, for environments where scripts are not on PATH."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="ichbatch")
