"""``python -m kimi_ref.serve``: see :mod:`kimi_ref.serve.cli`."""

import sys

from kimi_ref.serve.cli import main

sys.exit(main())
