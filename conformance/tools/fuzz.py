"""Differential fuzzing of the FA-2 contract against the real kernels (hypothesis-generated inputs).

    python -m conformance.tools.fuzz --profile device --out DIR     # writes DIR/fuzz.json and DIR/fuzz.md
    NSA_FUZZ_PROFILE=device python -m pytest conformance/test_fuzz_gpu.py -m gpu

For each generated call (dense or varlen, valid or broken: fp32, odd and > 256 head dims, head
counts that do not divide, zero KV heads, non-contiguous strides, broken cu_seqlens, max_seqlen
too small, windows) and each provider:

1. the contract's verdict, strict mode, on CPU copies of the inputs (caps of the GPU);
2. the kernel, in ONE long-lived worker subprocess that reads cases from stdin as JSON lines and
   answers one JSON line each; a CUDA fault poisons a process, so the worker exits after a CUDA
   error and is restarted after any death (signal, crash, timeout);
3. the output against a float64 reference of what the arguments say (``conformance.tools.probes._common``:
   bottom-right causal, -1 = unbounded window side, GQA head groups; for broken index arguments:
   the intended ones), within ``contracts.tolerances.lookup(dtype, "out")``.

Classification (``classify``): accepted and ok = true accept; accepted and the kernel raised,
crashed, hung or returned wrong/non-finite numbers = FALSE ACCEPT (must be 0); rejected and the
kernel failed = true reject; rejected but the kernel ran and matched = false reject (listed with
the rule ids, for the integrator to justify or fix). Cases rejected by a crash-kind rule are not
run (the probes show those crashes one at a time); ``run_crash_cases`` turns that on.

Profiles: ``ci`` (small, derandomized) and ``device`` (>= 2000 examples over both providers,
bounded to about 5 minutes on an H100; tensors stay small).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conformance.tools.probes import _common as C
from conformance.tools.subprocesses import signal_name

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "FUZZ "
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNEL_FAILURES = C.KERNEL_FAILURES
HEAD_DIMS = (32, 40, 59, 64, 72, 80, 96, 100, 128, 160, 192, 224, 256)
BIG_HEAD_DIMS = (264, 288, 320)
DENSE_MUTATIONS = ("fp32", "k_dtype", "head_dim_big", "head_dim_v", "heads_not_divisible", "heads_kv_zero",
                   "window_clamped", "empty_q", "empty_k")
VARLEN_MUTATIONS = ("fp32", "k_dtype", "head_dim_big", "head_dim_v", "heads_not_divisible", "heads_kv_zero",
                    "window_clamped", "cu_start", "cu_decreasing", "cu_overrun", "max_q_low", "max_k_low",
                    "max_q_one_causal", "gqa_decode")


@dataclass
class Profile:
    name: str
    examples_per_provider: int
    derandomize: bool
    seed: int
    time_budget_s: float          # stop running kernels after this (cases still get a verdict)
    max_restarts: int             # worker restarts allowed before rejected cases stop running
    case_timeout_s: float = 60.0
    run_crash_cases: bool = False


PROFILES = {
    "ci": Profile("ci", examples_per_provider=60, derandomize=True, seed=0, time_budget_s=150, max_restarts=8),
    "device": Profile("device", examples_per_provider=1100, derandomize=False, seed=20261125,
                      time_budget_s=280, max_restarts=30),
}


def profile_from_env(default: str = "ci") -> Profile:
    name = os.environ.get("NSA_FUZZ_PROFILE", "").strip() or default
    if name not in PROFILES:
        raise ValueError(f"NSA_FUZZ_PROFILE = {name!r}; known profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


# --- cases ---------------------------------------------------------------------------------------


@dataclass
class FuzzCase:
    """One call, JSON-able. Varlen: ``lens_q``/``lens_k`` are the intended sequences (q/k/v hold
    exactly their tokens); ``cu_q``/``cu_k``/``max_q``/``max_k`` are what is passed (maybe broken)."""

    provider: str
    layout: str                  # dense | varlen
    dtype: str                   # fp16 | bf16 | fp32
    hq: int
    hk: int
    d: int
    dv: int
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    stride: str = "contiguous"   # contiguous | heads_major | last_dim (stride(-1) == 2)
    k_dtype: str | None = None   # k and v in another dtype than q
    b: int = 1
    sq: int = 0
    sk: int = 0
    lens_q: list[int] = field(default_factory=list)
    lens_k: list[int] = field(default_factory=list)
    cu_q: list[int] = field(default_factory=list)
    cu_k: list[int] = field(default_factory=list)
    max_q: int = 0
    max_k: int = 0
    mutations: list[str] = field(default_factory=list)
    seed: int = 0
    id: int = 0
    expected_rule: str | None = None   # seed cases: the rule the case is meant to trip

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "FuzzCase":
        d = dict(d)
        d["window"] = tuple(d.get("window", (-1, -1)))
        return cls(**d)

    def label(self) -> str:
        shape = (f"b={self.b} sq={self.sq} sk={self.sk}" if self.layout == "dense"
                 else f"lens_q={self.lens_q} lens_k={self.lens_k} cu_q={self.cu_q} cu_k={self.cu_k} "
                      f"max_q={self.max_q} max_k={self.max_k}")
        extra = f" k_dtype={self.k_dtype}" if self.k_dtype else ""
        return (f"{self.provider} {self.layout} {self.dtype}{extra} hq={self.hq} hk={self.hk} d={self.d} dv={self.dv} "
                f"{shape} causal={self.causal} window={tuple(self.window)} stride={self.stride} "
                f"mutations={self.mutations or ['none']}")


def _strategies():
    from hypothesis import strategies as st

    windows = st.one_of(
        st.just((-1, -1)), st.just((-1, -1)),
        st.tuples(st.integers(0, 64), st.just(0)),
        st.tuples(st.integers(0, 64), st.integers(0, 64)),
        st.tuples(st.just(-1), st.integers(0, 64)),
        st.tuples(st.integers(0, 64), st.just(-1)),
    )
    return st, windows


def case_strategy(provider: str):
    """A hypothesis strategy of FuzzCase for ``provider``: valid calls and calls with 1-2 mutations."""
    st, windows = _strategies()

    @st.composite
    def build(draw) -> FuzzCase:
        # Categorical choices go through a hash of a wide integer: hypothesis favours the first
        # entries of sampled_from, which would starve later mutations and head dims.
        def pick(_draw, options):
            x = draw(st.integers(0, 2**64 - 1))
            return options[random.Random(x).randrange(len(options))]

        layout = pick(draw, ["dense", "varlen"])
        hk = draw(st.integers(1, 4))
        g = pick(draw, [1, 1, 2, 4])
        d = pick(draw, HEAD_DIMS)
        c = FuzzCase(provider=provider, layout=layout, dtype=pick(draw, ["fp16", "bf16"]),
                     hq=hk * g, hk=hk, d=d, dv=d, causal=draw(st.booleans()), window=draw(windows),
                     stride=pick(draw, ["contiguous", "contiguous", "contiguous", "heads_major", "last_dim"]),
                     seed=draw(st.integers(0, 2**31 - 1)))
        if layout == "dense":
            c.b, c.sq, c.sk = draw(st.integers(1, 3)), draw(st.integers(1, 160)), draw(st.integers(1, 160))
        else:
            n = draw(st.integers(1, 4))
            c.lens_q = draw(st.lists(st.integers(0, 130), min_size=n, max_size=n))
            c.lens_k = draw(st.lists(st.integers(0, 130), min_size=n, max_size=n))
            _sync_varlen(c)
        pool = DENSE_MUTATIONS if layout == "dense" else VARLEN_MUTATIONS
        names = [pick(draw, pool) for _ in range(pick(draw, [0, 0, 1, 1, 1, 2]))]
        for name in dict.fromkeys(names):
            _mutate(c, name, draw, st)
        return c

    return build()


def _sync_varlen(c: FuzzCase) -> None:
    c.cu_q, c.cu_k = C.cumulative(c.lens_q), C.cumulative(c.lens_k)
    c.max_q, c.max_k = max(c.lens_q, default=0), max(c.lens_k, default=0)


def _mutate(c: FuzzCase, name: str, draw, st) -> None:
    """Break ``c`` one way (some mutations do nothing for some shapes; the contract decides)."""
    c.mutations.append(name)
    if name == "fp32":
        c.dtype = "fp32"
    elif name == "k_dtype":
        c.k_dtype = "bf16" if c.dtype == "fp16" else "fp16"
    elif name == "head_dim_big":
        c.d = c.dv = draw(st.sampled_from(BIG_HEAD_DIMS))
    elif name == "head_dim_v":
        c.dv = draw(st.sampled_from([x for x in (64, 128, c.d - 8, c.d + 8) if x > 0 and x != c.d]))
    elif name == "heads_not_divisible":
        c.hk = draw(st.integers(2, 4))
        c.hq = c.hk * draw(st.integers(1, 3)) + draw(st.integers(1, c.hk - 1))
    elif name == "heads_kv_zero":
        c.hk = 0
    elif name == "window_clamped":
        sk = c.sk if c.layout == "dense" else c.max_k
        c.window = (draw(st.sampled_from([-1, 0, 3])), sk + draw(st.integers(0, 8)))
    elif name == "empty_q":
        c.sq = 0
    elif name == "empty_k":
        c.sk = 0
    elif name == "cu_start":
        key = draw(st.sampled_from(["cu_q", "cu_k"]))
        getattr(c, key)[0] = draw(st.integers(1, 3))
    elif name == "cu_decreasing" and len(c.lens_q) >= 2:
        key = draw(st.sampled_from(["cu_q", "cu_k"]))
        cu = getattr(c, key)
        i = draw(st.integers(1, len(cu) - 2))
        cu[i] = cu[i + 1] + draw(st.integers(1, 4))
    elif name == "cu_overrun":
        key = draw(st.sampled_from(["cu_q", "cu_k"]))
        getattr(c, key)[-1] += draw(st.integers(1, 8))
    elif name == "max_q_low" and c.max_q > 1:
        c.max_q = draw(st.integers(1, c.max_q - 1))
    elif name == "max_k_low" and c.max_k > 1:
        c.max_k = draw(st.integers(1, c.max_k - 1))
    elif name == "max_q_one_causal":
        c.causal = True
        c.lens_q = [max(n, 2) for n in c.lens_q]
        _sync_varlen(c)
        c.max_q = 1
    elif name == "gqa_decode":
        c.hk = max(c.hk, 1)
        c.hq = c.hk * 2
        c.lens_q = [draw(st.integers(0, 1)) for _ in c.lens_q]
        _sync_varlen(c)
        c.max_q = 1
        c.window, c.causal = (-1, -1), False


def _seed_dense(provider: str, **kw) -> FuzzCase:
    base = dict(provider=provider, layout="dense", dtype="fp16", hq=4, hk=2, d=64, dv=64, b=2, sq=33, sk=47, seed=1)
    return FuzzCase(**{**base, **kw})


def _seed_varlen(provider: str, **kw) -> FuzzCase:
    c = FuzzCase(provider=provider, layout="varlen", dtype="bf16", hq=4, hk=2, d=64, dv=64,
                 lens_q=[5, 70, 0, 11], lens_k=[9, 64, 3, 11], seed=2)
    _sync_varlen(c)
    fields = {**kw}
    mutations = fields.pop("mutations", [])
    c = dataclasses.replace(c, **fields)
    c.mutations = mutations
    return c


def seed_cases(provider: str) -> list[FuzzCase]:
    """Hand-made cases run before the generated ones: each mutation at least once, each layout and
    stride valid, and the rule each is meant to trip (``expected_rule``, None = valid)."""
    d, v = (lambda **kw: _seed_dense(provider, **kw)), (lambda **kw: _seed_varlen(provider, **kw))
    cases = [
        (d(), None), (v(), None), (d(causal=True, window=(15, 0)), None), (v(causal=True, window=(7, 0)), None),
        (d(stride="heads_major"), None), (v(stride="heads_major", causal=True), None),
        (d(sq=1, sk=97, hq=8, hk=1, causal=True), None),
        (v(lens_q=[1, 1, 1, 1], cu_q=[0, 1, 2, 3, 4], max_q=1), None),
        (d(stride="last_dim"), "FA2-LAST-DIM-STRIDE" if provider == "torch" else None),
        (d(d=59, dv=59), "FA2-HEAD-DIM-MULTIPLE" if provider == "torch" else None),
        (d(dtype="fp32", mutations=["fp32"]), "FA2-DTYPE"),
        (d(k_dtype="bf16", mutations=["k_dtype"]), "FA2-DTYPE-MATCH"),
        (d(d=264, dv=264, mutations=["head_dim_big"]), "FA2-HEAD-DIM-MAX"),
        (d(dv=128, mutations=["head_dim_v"]), "FA2-HEAD-DIM-V"),
        (d(hq=5, mutations=["heads_not_divisible"]), "FA2-HEADS-DIVISIBLE"),
        (d(hk=0, mutations=["heads_kv_zero"]), "FA2-HEADS-KV-ZERO"),
        (d(sq=16, sk=4, window=(-1, 4), mutations=["window_clamped"]), "FA2-WINDOW-RIGHT-CLAMPED"),
        (d(sq=0, mutations=["empty_q"]), "FA2-DENSE-EMPTY-Q"),
        (d(sk=0, mutations=["empty_k"]), "FA2-DENSE-EMPTY-K"),
        (v(cu_q=[2, 5, 75, 75, 86], mutations=["cu_start"]), "FA2-CU-SEQLENS-START"),
        (v(cu_k=[0, 9, 73, 70, 87], mutations=["cu_decreasing"]), "FA2-CU-SEQLENS-DECREASING"),
        (v(cu_q=[0, 5, 75, 75, 90], max_q=70, mutations=["cu_overrun"]), "FA2-CU-SEQLENS-OVERRUN"),
        (v(max_q=11, mutations=["max_q_low"]), "FA2-MAX-SEQLEN-Q-LOW"),
        (v(max_k=11, mutations=["max_k_low"]), "FA2-MAX-SEQLEN-K-LOW"),
        (v(max_q=1, hq=2, causal=True, mutations=["max_q_one_causal"]), "FA2-CAUSAL-DROPPED"),
        (v(lens_q=[1, 0, 1, 1], cu_q=[0, 1, 1, 2, 3], max_q=1, mutations=["gqa_decode"]), "FA2-VARLEN-GQA-DECODE"),
    ]
    out = []
    for case, rule in cases:
        case.expected_rule = rule
        out.append(case)
    return out


# --- tensors and calls ---------------------------------------------------------------------------


def _tensor(shape, dtype, stride: str, device: str, gen, fill: bool) -> torch.Tensor:
    """A tensor of ``shape`` with the layout ``stride`` asks for: heads_major puts the head dim
    outermost in memory, last_dim gives stride(-1) == 2."""
    if stride == "heads_major" and len(shape) >= 3:
        order = [len(shape) - 2] + [i for i in range(len(shape)) if i != len(shape) - 2]
        buf = torch.empty([shape[i] for i in order], dtype=dtype, device=device)
        inverse = [order.index(i) for i in range(len(shape))]
        t = buf.permute(*inverse)
    elif stride == "last_dim":
        t = torch.empty(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)[..., ::2]
    else:
        t = torch.empty(*shape, dtype=dtype, device=device)
    if fill and t.numel():
        t.copy_(torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype))
    return t


def build_call(c: FuzzCase, device: str, fill: bool) -> tuple[C.Call, dict]:
    """The provider's raw call for ``c`` on ``device`` (values only when ``fill``)."""
    gen = torch.Generator(device=device).manual_seed(c.seed) if fill else None
    qd = DTYPES[c.dtype]
    kd = DTYPES[c.k_dtype] if c.k_dtype else qd
    if c.layout == "dense":
        q = _tensor((c.b, c.sq, c.hq, c.d), qd, c.stride, device, gen, fill)
        k = _tensor((c.b, c.sk, c.hk, c.d), kd, c.stride, device, gen, fill)
        v = _tensor((c.b, c.sk, c.hk, c.dv), kd, c.stride, device, gen, fill)
        call = C.dense_call(c.provider, q, k, v, causal=c.causal, window=tuple(c.window))
    else:
        q = _tensor((sum(c.lens_q), c.hq, c.d), qd, c.stride, device, gen, fill)
        k = _tensor((sum(c.lens_k), c.hk, c.d), kd, c.stride, device, gen, fill)
        v = _tensor((sum(c.lens_k), c.hk, c.dv), kd, c.stride, device, gen, fill)
        call = C.varlen_call(c.provider, q, k, v, C.int32(c.cu_q, device), C.int32(c.cu_k, device),
                             c.max_q, c.max_k, causal=c.causal, window=tuple(c.window))
    return call, {"q": q, "k": k, "v": v}


def reference(c: FuzzCase, t: dict, dtype) -> torch.Tensor:
    """What the arguments say (intended cu_seqlens for varlen), in ``dtype``."""
    if c.hk == 0 or c.hq % c.hk:
        raise ValueError("no reference: query heads are not a multiple of key/value heads")
    if c.layout == "dense":
        return C.reference_dense(t["q"], t["k"], t["v"], causal=c.causal, window=tuple(c.window), dtype=dtype)
    return C.reference_varlen(t["q"], t["k"], t["v"], C.cumulative(c.lens_q), C.cumulative(c.lens_k),
                              causal=c.causal, window=tuple(c.window), dtype=dtype)


def verdict(c: FuzzCase, caps: str | None) -> list:
    """The contract's strict reasons for ``c`` (CPU tensors: no values needed but the index ones)."""
    call, _ = build_call(c, "cpu", fill=False)
    return C.contract_reasons(C.Setup(call, caps=caps), strict=True)


def classify(rejected: bool, outcome: str | None) -> str:
    """Contract verdict x kernel outcome -> true/false accept/reject, not run, or unverified."""
    if outcome is None:
        return "rejected_not_run" if rejected else "accepted_not_run"
    if outcome not in KERNEL_FAILURES and outcome != "ok":
        return "unverified"
    bad = outcome in KERNEL_FAILURES
    if rejected:
        return "true_reject" if bad else "false_reject"
    return "false_accept" if bad else "true_accept"


# --- the worker (runs the kernels) ---------------------------------------------------------------


def _fake_kernel(c: FuzzCase, t: dict):
    """CPU stand-in for tests of the plumbing: FA-2's process-killing and refusing cases, a hang on
    request (mutation "hang"), else the intended result."""
    if c.hk == 0:
        os.kill(os.getpid(), signal.SIGFPE)
    if "hang" in c.mutations:
        time.sleep(3600)
    if c.dtype == "fp32":
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if c.hq % c.hk or c.dv != c.d:
        raise RuntimeError("shape check failed")
    return reference(c, t, DTYPES[c.dtype])


def run_case(c: FuzzCase, backend: str) -> dict:
    """Build, call, judge one case in this process. ``backend``: "cuda" (the real kernel) or "fake"."""
    device = "cuda" if backend == "cuda" else "cpu"
    call, t = build_call(c, device, fill=True)
    qd = DTYPES[c.dtype]
    try:
        if backend == "cuda":
            fn = call.kernel()
            C.poison_allocator([((t["q"].shape[:-1] + (c.dv,)), qd)])
            result = fn(*call.args, **call.kwargs)
            torch.cuda.synchronize()
        else:
            result = _fake_kernel(c, t)
    except ImportError as exc:
        return {"id": c.id, "outcome": "skipped", "detail": f"{c.provider} not importable: {exc}"}
    except Exception as exc:  # noqa: BLE001 - every kernel failure is data
        outcome, detail = C.classify_exception(exc)
        return {"id": c.id, "outcome": outcome, "detail": detail}
    try:
        out = C.first_tensor(result)
        ref, base = reference(c, t, torch.float64), reference(c, t, qd)
    except Exception as exc:  # noqa: BLE001
        outcome, detail = C.classify_exception(exc)
        if outcome == "cuda_error":
            return {"id": c.id, "outcome": outcome, "detail": detail}
        return {"id": c.id, "outcome": "unverified", "detail": f"kernel returned; no reference: {detail}"}
    outcome, detail = C.compare(out, ref, base, qd)
    if outcome == "ok" and not bool(torch.isfinite(out.float()).all()):
        outcome, detail = "silent_corruption", "non-finite output where the reference is finite"
    return {"id": c.id, "outcome": outcome, "detail": detail[:500]}


def worker_main(backend: str) -> int:
    """Read cases (JSON lines) from stdin, answer one ``FUZZ {json}`` line each; exit after a CUDA error."""
    if backend == "cuda":
        torch.cuda.init()
    ready = {"ready": True, "caps": C.device_caps() if backend == "cuda" else None, "backend": backend,
             "pid": os.getpid()}
    print(PREFIX + json.dumps(ready), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        case = FuzzCase.from_dict(json.loads(line))
        reply = run_case(case, backend)
        print(PREFIX + json.dumps(reply, default=str), flush=True)
        if reply["outcome"] == "cuda_error":
            return 3  # the CUDA context may be unusable: the parent starts a fresh worker
    return 0


class Worker:
    """One long-lived worker subprocess; restarted after it dies."""

    def __init__(self, backend: str, timeout_s: float, start_timeout_s: float = 180.0):
        self.backend, self.timeout_s, self.start_timeout_s = backend, timeout_s, start_timeout_s
        self.proc = None
        self.stderr = None
        self.starts = 0
        self.caps = None

    def _reader(self, proc, lines: queue.Queue):
        for line in proc.stdout:
            if line.startswith(PREFIX):
                lines.put(line[len(PREFIX):])
        lines.put(None)

    def start(self) -> None:
        if self.stderr is not None:
            self.stderr.close()
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "conformance.tools.fuzz", "--worker", "--backend", self.backend],
                                     cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._reader, args=(self.proc, self.lines), daemon=True).start()
        self.starts += 1
        first = self._get(self.start_timeout_s)
        if first is None or first == "TIMEOUT":
            self._kill()
            raise RuntimeError(f"fuzz worker did not start ({first or 'exited'}): {self._stderr_tail()}")
        self.caps = json.loads(first).get("caps")

    def _get(self, timeout):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return "TIMEOUT"

    def _stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            text = self.stderr.read()
        except (OSError, ValueError):
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return " / ".join(lines[-3:])[:400]

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait()
        self.proc = None

    def run(self, case: FuzzCase) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(case.to_json() + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        line = self._get(self.timeout_s)
        if line == "TIMEOUT":
            self._kill()
            return {"id": case.id, "outcome": "timeout", "detail": f"no answer within {self.timeout_s:g} s"}
        if line is not None:
            reply = json.loads(line)
            if reply.get("outcome") == "cuda_error":  # the worker exits by itself; make sure
                self._finish()
            return reply
        rc = self._finish()
        tail = self._stderr_tail()
        if rc < 0:
            return {"id": case.id, "outcome": "killed_by_signal", "detail": f"{signal_name(rc)} (signal {-rc})"}
        low = tail.lower()
        if any(p in low for p in C.CUDA_ERROR_PATTERNS):
            return {"id": case.id, "outcome": "cuda_error", "detail": f"worker exited {rc}: {tail}"}
        return {"id": case.id, "outcome": "probe_error", "detail": f"worker exited {rc}: {tail}"}

    def _finish(self) -> int:
        """Wait for a worker that is exiting (kill it if it hangs); its return code."""
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._kill()
            rc = -signal.SIGKILL
        self.proc = None
        return rc

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._kill()
        self.proc = None


# --- the engine ----------------------------------------------------------------------------------


class Engine:
    """Verdict, run decision, worker call and classification for each case; keeps the records."""

    def __init__(self, profile: Profile, backend: str = "cuda", caps: str | None = None, log=print):
        self.profile, self.backend, self.log = profile, backend, log
        self.worker = Worker(backend, profile.case_timeout_s)
        self.caps = caps
        self.records: list[dict] = []
        self.logged: dict = {}
        self.started = time.monotonic()
        self.next_id = 0

    def _ensure_worker(self) -> None:
        if self.worker.proc is None:
            self.worker.start()
            self.caps = self.caps or self.worker.caps

    def handle(self, case: FuzzCase) -> dict:
        case.id = self.next_id
        self.next_id += 1
        if self.worker.starts == 0:
            self._ensure_worker()
        reasons = verdict(case, self.caps)
        rules = [r.rule for r in reasons]
        kinds = {r.kind for r in reasons}
        elapsed = time.monotonic() - self.started
        skip = None
        if elapsed > self.profile.time_budget_s:
            skip = "time budget"
        elif "crash" in kinds and not self.profile.run_crash_cases:
            skip = "rejected by a crash rule (not run)"
        elif rules and self.worker.starts - 1 >= self.profile.max_restarts:
            skip = "worker restart budget"
        reply = None if skip else self.worker.run(case)
        outcome = None if reply is None else reply["outcome"]
        cls = classify(bool(rules), outcome)
        rec = {"id": case.id, "provider": case.provider, "layout": case.layout, "case": dataclasses.asdict(case),
               "label": case.label(), "rules": rules, "rule_kinds": sorted(kinds), "outcome": outcome,
               "detail": skip if reply is None else reply.get("detail", ""), "class": cls}
        self.records.append(rec)
        key = "false_accept" if cls == "false_accept" else (cls, tuple(rules))
        self.logged[key] = self.logged.get(key, 0) + 1
        if cls == "false_accept" or (cls == "false_reject" and self.logged[key] <= 3):
            self.log(f"[fuzz] {cls}: {case.label()} -> "
                     f"{outcome}: {str(rec['detail'])[:160]} | rules {rules or 'none'}")
        if len(self.records) % 250 == 0:
            self.log(f"[fuzz] {len(self.records)} cases, {time.monotonic() - self.started:.0f} s, "
                     f"worker starts {self.worker.starts}")
        return rec

    def close(self) -> None:
        self.worker.close()

    def summary(self) -> dict:
        return summarize(self.records, self.profile, self.caps, time.monotonic() - self.started, self.worker.starts)


def summarize(records: list[dict], profile: Profile, caps, elapsed: float, worker_starts: int) -> dict:
    def counts(rs):
        out = {"cases": len(rs), "accepted": sum(not r["rules"] for r in rs), "rejected": sum(bool(r["rules"]) for r in rs),
               "ran": sum(r["outcome"] is not None for r in rs)}
        for cls in ("true_accept", "false_accept", "true_reject", "false_reject", "rejected_not_run",
                    "accepted_not_run", "unverified"):
            out[cls] = sum(r["class"] == cls for r in rs)
        return out

    providers = sorted({r["provider"] for r in records})
    false_rejects: dict[str, list] = {}
    for r in records:
        if r["class"] == "false_reject":
            for rule in r["rules"]:
                false_rejects.setdefault(rule, []).append(r["label"])
    return {
        "profile": dataclasses.asdict(profile), "caps": caps, "elapsed_s": round(elapsed, 1),
        "worker_starts": worker_starts, "total": counts(records),
        "by_provider": {p: counts([r for r in records if r["provider"] == p]) for p in providers},
        "false_accepts": [{"label": r["label"], "outcome": r["outcome"], "detail": r["detail"]}
                          for r in records if r["class"] == "false_accept"],
        "false_rejects_by_rule": {rule: {"count": len(v), "examples": v[:5]} for rule, v in sorted(false_rejects.items())},
        "unverified": [{"label": r["label"], "detail": r["detail"]} for r in records if r["class"] == "unverified"][:20],
    }


def run_fuzz(profile: Profile, providers: list[str], *, backend: str = "cuda", log=print,
             cases: list[FuzzCase] | None = None) -> tuple[dict, list[dict]]:
    """Fuzz each provider with ``profile`` (or run the given ``cases``); returns (summary, records)."""
    engine = Engine(profile, backend=backend, log=log)
    try:
        if cases is not None:
            for case in cases:
                engine.handle(case)
        else:
            from hypothesis import HealthCheck, Phase, given, seed, settings

            for provider in providers:
                for case in seed_cases(provider):
                    engine.handle(case)
            for i, provider in enumerate(providers):
                @settings(max_examples=profile.examples_per_provider, derandomize=profile.derandomize,
                          database=None, deadline=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(case_strategy(provider))
                def prop(case):
                    engine.handle(case)

                if not profile.derandomize:
                    prop = seed(profile.seed + i)(prop)
                prop()
    finally:
        engine.close()
    return engine.summary(), engine.records


# --- report --------------------------------------------------------------------------------------


def markdown(summary: dict, env: dict | None = None) -> str:
    env = env or {}
    t = summary["total"]
    lines = [
        "# FA-2 contract differential fuzzing",
        "",
        f"Profile `{summary['profile']['name']}` ({summary['profile']['examples_per_provider']} examples per provider), "
        f"caps {summary['caps']}, {summary['elapsed_s']} s, worker started {summary['worker_starts']} time(s).",
        f"Environment: GPU {env.get('gpu', 'n/a')}, torch {env.get('torch', 'n/a')}, flash_attn {env.get('flash_attn', 'n/a')}.",
        "",
        "| provider | cases | accepted | rejected | ran | true accept | FALSE ACCEPT | "
        "true reject | false reject | rejected, not run | unverified |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in [*summary["by_provider"].items(), ("all", t)]:
        lines.append(f"| {name} | {c['cases']} | {c['accepted']} | {c['rejected']} | {c['ran']} | {c['true_accept']} | "
                     f"{c['false_accept']} | {c['true_reject']} | "
                     f"{c['false_reject']} | {c['rejected_not_run']} | {c['unverified']} |")
    lines += ["", "## False accepts (the contract accepted, the kernel failed)", ""]
    if not summary["false_accepts"]:
        lines.append("None.")
    for fa in summary["false_accepts"][:50]:
        lines.append(f"- `{fa['label']}` -> {fa['outcome']}: {str(fa['detail'])[:300]}")
    lines += ["", "## False rejects by rule (the contract rejected, the kernel ran and matched)", "",
              "Each needs a justification (e.g. a semantics rule that only matters for lse or windows) or a fix.", ""]
    if not summary["false_rejects_by_rule"]:
        lines.append("None.")
    for rule, info in summary["false_rejects_by_rule"].items():
        lines.append(f"- `{rule}`: {info['count']} case(s), e.g. `{info['examples'][0]}`")
    if summary["unverified"]:
        lines += ["", "## Unverified (kernel returned, no reference)", ""]
        lines += [f"- `{u['label']}`: {u['detail']}" for u in summary["unverified"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.tools.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None, choices=list(PROFILES), help="default: NSA_FUZZ_PROFILE or ci")
    ap.add_argument("--out", default=None, help="folder for fuzz.json and fuzz.md")
    ap.add_argument("--providers", default=None, help="comma-separated (default: every usable one)")
    ap.add_argument("--examples", type=int, default=None, help="examples per provider (overrides the profile)")
    ap.add_argument("--backend", default="cuda", choices=["cuda", "fake"], help="fake: CPU stand-in, for testing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.backend)
    profile = PROFILES[args.profile] if args.profile else profile_from_env()
    if args.examples:
        profile = dataclasses.replace(profile, examples_per_provider=args.examples)
    if args.backend == "cuda" and not torch.cuda.is_available():
        print("no CUDA: nothing to fuzz (the kernels need a GPU); use --backend fake to test the plumbing")
        return 0
    if args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    else:
        providers = [p for p in C.BOTH if C.provider_usable(p) is None]
    from conformance.tools.envinfo import collect

    env = collect()
    summary, records = run_fuzz(profile, providers, backend=args.backend)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fuzz.json").write_text(json.dumps({"env": env, "summary": summary, "records": records},
                                                  indent=1, default=str), encoding="utf-8")
        (out / "fuzz.md").write_text(markdown(summary, env), encoding="utf-8")
    print(markdown(summary, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
