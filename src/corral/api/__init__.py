"""The HTTP API of ``corral serve``."""
