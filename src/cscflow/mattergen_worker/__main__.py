"""``python -m cscflow.mattergen_worker``: the JSON-lines worker (see server.py)."""

import sys

from .server import main

sys.exit(main())
