"""Where corral keeps things: template files on disk (and, later, the SQLite store)."""
