"""Evaluation entry point: ``python eval.py --config configs/<name>.py --config.checkpoint=DIR``."""

import sys


def main() -> int:
    print(__doc__.strip())
    print("Evaluation is not wired up yet; see README.md for what runs today.")
    return 0 if len(sys.argv) == 1 or "--help" in sys.argv else 2


if __name__ == "__main__":
    sys.exit(main())
