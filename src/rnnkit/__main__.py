"""``python -m rnnkit`` (and ``torchrun -m rnnkit``) runs the command line."""

from rnnkit.cli import main

raise SystemExit(main())
