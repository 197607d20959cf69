"""Jobs beside environments (issue 13): services, batch jobs, DAGs and periodic jobs.

Pure core, like ``corral.templates``: their specifications, Makeflow files and cron
schedules, read and computed with no I/O, no clock and no randomness (both are
parameters). Running them is the control plane's part.
"""
