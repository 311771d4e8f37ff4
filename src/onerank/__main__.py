"""``python -m onerank``: the ``onerank`` command."""

import sys

from onerank.cli import main

sys.exit(main())
