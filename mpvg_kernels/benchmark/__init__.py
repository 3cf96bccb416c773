"""Benchmarks: one timing harness (interleaved rounds, malloc settings, quantiles, environment capture, Markdown
and JSON writers) and the op, model and demo benchmarks built on it. ``benchmarks/*.py`` are thin scripts over it.

May import ops, layers and models (and :mod:`mpvg_kernels.device`); never training.
"""
