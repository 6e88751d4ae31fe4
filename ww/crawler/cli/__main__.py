"""`python -m ww.crawler.cli`: the same as `ww-crawl`."""

import sys

from .main import main

sys.exit(main())
