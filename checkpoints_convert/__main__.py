"""Command line: ``python -m checkpoints_convert <model> --src ... --dst ...``.

Each converter module in this package provides ``add_parser(subparsers)`` which registers its
sub-command and sets ``func`` on the parsed arguments.
"""

import argparse
import importlib
import sys

from m2sa_jax.checkpoints.torch_io import UnsafeCheckpointError

CONVERTERS = ("sam", "llava", "m2sa")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m checkpoints_convert",
        description="Convert PyTorch checkpoints to m2sa-jax parameters (orbax) and back.")
    sub = parser.add_subparsers(dest="model", required=True)
    for name in CONVERTERS:
        try:
            module = importlib.import_module(f"checkpoints_convert.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"checkpoints_convert.{name}":
                continue
            raise
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, FileExistsError, ValueError, UnsafeCheckpointError) as e:
        # ConversionError and CorruptCheckpointError are ValueErrors: every message names the
        # file and the fix; a traceback would only bury it
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
