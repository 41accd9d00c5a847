"""byoi-agent: OVHcloud-style Bring Your Own Image installs from a rescue environment."""

import sys

__version__ = "0.1.0"

# httpx's package imports its command-line client, which the agent never runs; where click,
# pygments and rich are installed that is 40 ms of every start. A None entry makes that one
# import fail, and httpx then defines a stand-in (httpx.main) as it does without them.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
