"""``python -m bavq.export CHECKPOINT --out DIR`` = ``bavq-export``."""

import sys

from bavq.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main(prog="python -m bavq.export"))
