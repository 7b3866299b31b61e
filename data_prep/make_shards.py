"""Write or verify WebDataset shards: ``python data_prep/make_shards.py [write|verify] ...``.

A thin wrapper of ``bavq-prep`` (the logic lives in :mod:`bavq.data.prep`); see ``--help``.
"""

import sys

from bavq.data.prep import main

if __name__ == "__main__":
    sys.exit(main())
