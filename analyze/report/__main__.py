"""python -m analyze.report: write a report, or a screenshot of one (see analyze.report.cli)."""

import sys

from analyze.report.cli import main

sys.exit(main())
