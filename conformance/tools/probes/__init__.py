"""Single-file crash diagnostics for FA-2: one script per crash/corruption class.

Each ``conformance/tools/probes/<name>.py`` prints the environment, the exact inputs, the call, what the
contract says about it (rule ids), and - only where CUDA is present (or ``--run-kernel``) - what the
raw kernel does: ``ok``, ``clean_error``, ``cuda_error``, ``silent_corruption`` (or the process dies,
which only ``conformance.tools.probes.runner`` sees as ``killed_by_signal``).

    python conformance/tools/probes/heads_kv_zero.py --provider torch
    python -m conformance.tools.probes.runner --out artifacts/<day>/fa2_harden

Shared code: ``conformance.tools.probes._common``.
"""
