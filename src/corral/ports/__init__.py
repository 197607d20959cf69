"""Interfaces between the controller and what it drives: backends, stores, clocks."""
