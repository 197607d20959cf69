"""The web GUI: static files served by ``corral serve`` at ``/`` (no build step)."""

from __future__ import annotations

import os

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
