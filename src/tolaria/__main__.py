"""``python -m tolaria``: the ``tolaria`` command."""

import sys

from tolaria.cli import main

sys.exit(main())
