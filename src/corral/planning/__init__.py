"""Placement of tasks on nodes. Pure: the snapshot, the request and the seed decide."""
