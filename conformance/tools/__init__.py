"""Tools around the conformance spec: what runs, measures and documents it, not what it asserts.

- ``cli``: the ``nsa-fa2`` command (env, check, repro, bench)
- ``bench``, ``analysis``: the timing sweep and its thresholds, speed gates and plots
- ``fuzz``: differential fuzzing of the FA-2 contract against the kernels
- ``probes``: crash probes, each in its own process (``probes.runner``)
- ``docs``: the generated parts of the Markdown documentation
- ``envinfo``, ``report``: the environment record and the check report
- ``device/``: scripts for one call on the lent GPU (not a package)

The spec itself (tests, brute force, cases, families, assertions, rules, capabilities, plugin,
adapters) is the rest of ``conformance/``.
"""
