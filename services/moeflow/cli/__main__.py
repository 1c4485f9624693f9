"""``python -m moeflow.cli``: the console script, as the runtime starts its processes."""

import sys

from moeflow.cli import main

sys.exit(main())
