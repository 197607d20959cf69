"""The state machines of environments and tasks, and hook ordering. Pure: no I/O."""
