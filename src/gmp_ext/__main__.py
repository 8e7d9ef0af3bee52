"""``python -m gmp_ext [command]``: diagnostics by default, else the ``gmp-ext`` CLI."""

from __future__ import annotations

import sys

from gmp_ext.app.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["info"]))
