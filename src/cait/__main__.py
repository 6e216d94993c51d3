"""``python -m cait`` runs the command line."""

import os
import sys

from cait.cli import main

if "TORCHELASTIC_RUN_ID" in os.environ:
    # under torchrun: an uncaught error's traceback goes into torchrun's failure report
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

sys.exit(main())
