"""The binary's entry point: the same `dify-local` command the installed package provides."""

from runner.cli import main

if __name__ == "__main__":
    main(prog_name="dify-local")
