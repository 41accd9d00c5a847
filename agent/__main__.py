"""``python -m agent``: the same command line as ``byoi-agent``."""

import sys

from agent.cli import main

sys.exit(main())
