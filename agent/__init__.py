"""byoi-agent: OVHcloud-style Bring Your Own Image installs from a rescue environment."""

__version__ = "0.1.0"
