"""``python -m normzoo.study [options]``: the same as ``normzoo study [options]``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
