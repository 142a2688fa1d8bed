"""``python -m connhex_edge_ota``: the command line."""

import sys

from connhex_edge_ota.cli import main

sys.exit(main())
