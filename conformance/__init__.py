"""Executable specification for FA-2 inside NSA: parity, edge shapes, probes and speed gates.

Point it at another implementation with ``pytest conformance --nsa-impl=pkg.module:function``.
"""
