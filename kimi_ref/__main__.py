"""``python -m kimi_ref`` is ``python -m kimi_ref.chat`` (same options; see kimi_ref/chat.py)."""

from __future__ import annotations

import sys

from kimi_ref.chat import main

if __name__ == "__main__":
    sys.exit(main())
