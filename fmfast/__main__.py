"""``python -m fmfast``: the ``fmfast`` command."""
from fmfast.cli import main

raise SystemExit(main())
