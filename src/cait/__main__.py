"""``python -m cait`` runs the command line."""

import sys

from cait.cli import main

sys.exit(main())
