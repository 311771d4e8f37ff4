"""``python -m onerank``: the ``onerank`` command."""

import sys

from onerank.cli import main

if __name__ == "__main__":  # importing the module (a walk over the package) runs nothing
    sys.exit(main())
