"""``python -m mlagen`` runs the command line (same as the ``mlagen`` script)."""
import sys

from .cli import main

sys.exit(main())
