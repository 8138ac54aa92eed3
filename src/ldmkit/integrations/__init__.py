"""Hooks that put the guide's vital signs into other trainers' loops (``accelerate``)."""
