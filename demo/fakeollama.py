"""Serve the demo upstream: ``python demo/fakeollama.py --port 11434`` (what scripts/serve,
the benchmark and the README run).

The fake itself is the package demo/fakeollama/. This file only runs it: for ``import
fakeollama`` Python takes the package (a folder with ``__init__.py`` wins over a module of
the same name in the same folder), so this file is never imported.
"""

import sys

from fakeollama import main

if __name__ == "__main__":
    sys.exit(main())
