"""``python -m fakeollama`` (with demo/ on the path) or ``python demo/fakeollama``: serve the
demo upstream in the foreground. ``python demo/fakeollama.py``, what scripts/serve runs,
does the same.
"""

import sys

if not __package__:
    # Run as a folder: sys.path[0] is this folder. Put demo/ there instead, so `fakeollama`
    # imports as the package and none of its modules can shadow another module.
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from fakeollama.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
