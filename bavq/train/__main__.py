"""`python -m bavq.train` takes the same arguments as `bavq-train`."""

import sys

from bavq.train.main import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m bavq.train"))
