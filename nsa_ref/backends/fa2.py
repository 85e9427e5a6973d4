"""The FA-2 backend: NSA's cmp, sel and win branches over an FA-2 provider (``nsa_ref.fa2``).

Its facts: the branches, the dtypes (fp16 and bf16 natively, fp32 cast to one of them), its
switches (NSA_USE_FA2, NSA_USE_FA2_<BRANCH>), the tuned shortest T per GPU and head dim
(``fa2_thresholds.yaml``, NSA_FA2_MIN_LEN_<BRANCH>), the provider (NSA_FA2_PROVIDER) and the
FA-2 input contract over the branch's planned calls (``nsa_ref.fa2.calls``; NSA_FA2_CONTRACTS).
The plan that passed the contract is the one the branch then runs.
"""
from __future__ import annotations

import torch

from nsa_ref import fa2
from nsa_ref.backends.base import BranchCall, dtype_refusal
from nsa_ref.fa2 import calls, thresholds


class FA2Unavailable(RuntimeError):
    """backend='fa2' was asked for explicitly but FA-2 cannot run this call."""


class FA2Backend:
    name, label = "fa2", "FA-2"
    branches = ("cmp", "sel", "win")
    dtypes = calls.FA2_DTYPES + (torch.float32,)
    max_head_dim = None  # the contracts judge head dims per provider and arch

    def _gate(self, call: BranchCall, explicit: bool) -> str | None:
        """The switches ('auto' only), the device and the dtype: why FA-2 is not even tried."""
        s, branch = call.settings, call.branch
        flag = {"win": s.use_fa2_win, "cmp": s.use_fa2_cmp, "sel": s.use_fa2_sel}[branch]
        if not explicit and not s.use_fa2:
            return "disabled by NSA_USE_FA2=0"
        if not explicit and not flag:
            return f"disabled by NSA_USE_FA2_{branch.upper()}=0"
        if call.device.device_type != "cuda":
            return f"inputs on {call.device.device_type}, FA-2 needs CUDA"
        return dtype_refusal(self, call.dtype, "fp16, bf16, fp32 via cast")

    def min_len(self, call: BranchCall) -> tuple[int, str]:
        """(shortest T routed to FA-2 under 'auto', where that number comes from)."""
        s, branch = call.settings, call.branch
        if branch == "sel":
            # Measured on H100: the gather path beats SDPA's gather from T=1K; no per-T threshold yet.
            return 0, "no threshold for sel"
        flag = {"win": s.fa2_min_len_win, "cmp": s.fa2_min_len_cmp}[branch]
        if flag is not None:
            return flag, f"NSA_FA2_MIN_LEN_{branch.upper()}"
        return thresholds.threshold_min_len(branch, call.device.gpu(), call.q.shape[-1]), "fa2_thresholds.yaml"

    def refusal(self, call: BranchCall, explicit: bool) -> str | None:
        """The NSA_USE_FA2* switches and the minimum lengths steer 'auto'; an explicit
        backend='fa2' skips them and keeps only what FA-2 needs (CUDA, a provider, the contract)."""
        why = self._gate(call, explicit)
        if why is not None:
            return why
        s = call.settings
        provider = call.device.fa2_provider_for(s.fa2_provider)
        if provider is None:
            return f"no usable FA-2 provider for NSA_FA2_PROVIDER={s.fa2_provider}"
        contract_provider, call.memo["provider"] = provider
        if not explicit:
            min_len, source = self.min_len(call)
            if call.q.shape[0] < min_len:
                return f"T below the FA-2 minimum length ({source})"
        plan = call.memo["plan"] = calls.plan(call.branch, call.q, call.k, call.v, call.cfg, call.cu_seqlens,
                                              s.fa2_pref_fp16)
        if s.fa2_contracts == "off":
            return None
        return plan.contract_refusal(requires_grad=call.training, caps=call.device.caps(),
                                     provider=contract_provider)

    def describe(self, call: BranchCall, explicit: bool) -> str:
        provider = call.memo["provider"]  # None on a described device (router.DeviceFacts)
        return "fa2" if provider is None else f"{provider.name} {provider.version()}"

    def unavailable(self, branch: str, why: str) -> Exception:
        return FA2Unavailable(f"backend='fa2' requested for {branch} but FA-2 cannot run it: {why}")

    def run(self, route, branch: str, args: tuple, cu_seqlens):
        fn = {"cmp": fa2.cmp_attention, "sel": fa2.sel_attention, "win": fa2.win_attention}[branch]
        return fn(*args, cu_seqlens, provider=route.provider, pref_fp16=route.pref_fp16, plan=route.plan)
