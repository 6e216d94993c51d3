"""``python -m cait`` runs the command line (also what ``torchrun -m cait`` uses)."""

import sys

from cait.cli import main

sys.exit(main())
