"""``python -m bavq.report`` = ``bavq-report``."""

import sys

from bavq.report import main

sys.exit(main())
