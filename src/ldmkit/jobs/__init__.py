"""Whole jobs made of the layers below: train then report (``ldmkit run``), diagnose then
repair (``ldmkit fix``)."""
