"""NSA's backends, each with its facts and refusals in one module (protocol: ``backends.base``).

``exact``: reference, sdpa, torch (selection); ``fa2``: FA-2 over a provider; ``triton``: the
Triton kernels. ``PRIORITY`` is the order in which ``nsa_ref.router`` tries them.
"""
from nsa_ref.backends.exact import ReferenceBackend, SdpaBackend, TorchSelection
from nsa_ref.backends.fa2 import FA2Backend, FA2Unavailable
from nsa_ref.backends.triton import TritonBackend, TritonUnavailable

#: Fastest first. "auto" takes the first that covers the branch and does not refuse; sdpa and
#: torch never refuse, so "auto" never reaches the reference.
PRIORITY = (TritonBackend(), FA2Backend(), SdpaBackend(), ReferenceBackend(), TorchSelection())
BY_NAME = {b.name: b for b in PRIORITY}

__all__ = ["BY_NAME", "FA2Unavailable", "PRIORITY", "TritonUnavailable"]
