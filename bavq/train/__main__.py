"""`python -m bavq.train` takes the same arguments as `bavq-train`."""

import sys

from bavq.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(prog="python -m bavq.train"))
