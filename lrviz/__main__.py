"""``python -m lrviz``: the same as the ``lrviz`` command."""

import sys

from .cli import main

sys.exit(main())
