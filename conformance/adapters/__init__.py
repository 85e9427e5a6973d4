"""Adapters: third-party NSA implementations behind the conformance suite's slots.

An adapter module exposes one function per slot it can fill (``nsa_attention``, ``cmp_attention``,
``sel_attention``, ``win_attention``, ``select_blocks``, ``compress``; signatures in
``conformance.impl``), each carrying ``fn.capabilities`` (``device -> Capabilities``) that
declares honestly what the third party supports. Point the suite at one with e.g.
``python -m pytest conformance --nsa-impl=conformance.adapters.fla:nsa_attention``.

An adapter only converts conventions (layouts, index dtypes, padding, log-sum-exp sentinels); it
never corrects the third party's semantics, so every difference the suite finds is the third
party's own.

Rule: never vendor third-party code into this repository. The third party is imported from where
the user installed it (a package, or a checkout on PYTHONPATH), lazily, inside the calls: importing
an adapter module never fails. When the third party is missing, its capabilities say
``unavailable`` (every test is then "not applicable" with that reason) and its functions raise an
ImportError saying how to install it.
"""
