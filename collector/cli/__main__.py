"""`python -m routelens.collector.cli`: the `routelens` command."""

import sys

from . import main

sys.exit(main())
