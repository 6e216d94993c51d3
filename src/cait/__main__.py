"""``python -m cait`` runs the command line."""

import os
import sys

try:
    from cait.cli import main
except KeyboardInterrupt:  # Ctrl-C while importing: one line, as anywhere else
    print("cait: interrupted", file=sys.stderr)
    sys.exit(130)  # cait.cli.EXIT_INTERRUPTED, which could not be imported

if "TORCHELASTIC_RUN_ID" in os.environ:
    # under torchrun: an uncaught error's traceback goes into torchrun's failure report
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

sys.exit(main())
