"""``python -m fastdiff {bench,sample,train}``: see :mod:`fastdiff.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
