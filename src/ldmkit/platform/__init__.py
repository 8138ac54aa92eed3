"""What ldmkit needs of the machine: safe files (atomic writes, no links followed), the fast
path (precision and compilation per device), processes (DDP ranks) and preemption signals.

The lowest layer: it imports nothing else of ldmkit but ``errors``.
"""
