"""``python -m agent``: the same command line as ``byoi-agent``."""

from agent.cli import run

run()
