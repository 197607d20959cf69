"""corral: one control system for an experiment's whole computing farm."""

__version__ = "0.1.0"
