"""Write or verify WebDataset shards: ``python data_prep/make_shards.py [write|verify] ...``.

A thin wrapper of ``bavq-prep`` (the application is :mod:`bavq.prep`); see ``--help``.
"""

import sys

from bavq.prep import main

if __name__ == "__main__":
    sys.exit(main())
