"""``python -m fxcompress.cli``: the ``fxcompress`` command where the console script is not installed."""

import sys

from fxcompress.cli.main import main

sys.exit(main())
