"""`python -m ww` is the `ww` command."""

import sys

from ww.cli import main

sys.exit(main())
