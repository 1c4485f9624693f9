"""`python -m moeflow.training ...` is `moeflow finetune ...`."""

from __future__ import annotations

import sys

from moeflow.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
