"""Pure computation for edgeloop's ML loop: streaming anomaly detectors and NAB scoring.

Nothing here opens a socket or reads a clock; the only I/O is reading benchmark data files
in :mod:`edgeloop.ml.nab_corpus`. The cloud and the inference component call this package;
it calls neither.
"""
