"""``python -m slidemil <stage> ...``, the same as the ``slidemil`` command."""

from slidemil.cli import main

raise SystemExit(main())
