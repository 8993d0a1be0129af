"""``python -m trio_sessions``: the ``trio-sessions`` command."""

from __future__ import annotations

from ._cli import main

if __name__ == "__main__":
    main()
