"""A run directory: its layout (``layout.RunDir``, the one owner of every path in it), the
lock that keeps one writer, checkpoint files, and the vital signs' context of a saved run.
"""
