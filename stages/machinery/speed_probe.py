"""The measurements behind ``precision: auto`` (``stages/machinery/runtime.choose_precision``): timing
a training stage's own step in several precisions, and the per-machine cache of the results.

A probe (:class:`PrecisionProbe`) names the stage and its model and batch shape, and builds on
demand a function that runs one training step (:func:`training_step_timer`: a copy of the run's
model, an Adam step) in a given Lightning precision. :func:`measure_precisions` times the
precisions interleaved (A B A B ...) and leaves the global RNG as it found it.
:class:`PrecisionCache` keeps the seconds per step by :func:`precision_key` (machine, stage,
shape) in a small JSON file, so each machine measures each shape once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("egoslots")

FP32, BF16, FP16 = "32-true", "bf16-mixed", "16-mixed"


@dataclass
class PrecisionProbe:
    """What ``precision: auto`` measures: one stage's own training step.

    ``stage`` and ``shape`` (model and batch sizes, JSON-able) key the cache; ``make_step``
    builds, only when a probe must run, a function that runs one training step (forward,
    backward, optimizer) in the Lightning precision it is given (:func:`training_step_timer`).
    """

    stage: str
    shape: dict
    make_step: Callable[[], Callable[[str], None]]
    warmup: int = 1
    steps: int = 3


def measure_precisions(probe: PrecisionProbe, precisions: list[str]) -> dict[str, float]:
    """Median seconds per training step in each precision, steps interleaved (A B A B ...) so
    that a change of load on a shared machine touches all of them alike. The global RNG state
    is restored afterwards: the probe leaves a run's random draws as they were."""
    with torch.random.fork_rng(devices=_cuda_devices()):
        step = probe.make_step()
        for precision in precisions:
            for _ in range(probe.warmup):
                step(precision)
        times: dict[str, list[float]] = {p: [] for p in precisions}
        for _ in range(probe.steps):
            for precision in precisions:
                start = time.perf_counter()
                step(precision)
                times[precision].append(time.perf_counter() - start)
    return {p: statistics.median(t) for p, t in times.items()}


def _cuda_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def training_step_timer(
    model: torch.nn.Module,
    loss_of: Callable[[torch.nn.Module], torch.Tensor],
    device: str,
    copy_model: bool = True,
) -> Callable[[str], None]:
    """A function that runs one training step of a copy of ``model`` (``loss_of(model)``
    forward, backward, an Adam step) in a given Lightning precision: autocast to bf16 / fp16 for
    the mixed ones, as Lightning does. The copy keeps the real model's weights untouched
    (``copy_model=False``: ``model`` is a fresh one built for the probe, trained as it is).
    """
    model = (copy.deepcopy(model) if copy_model else model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    dtypes = {BF16: torch.bfloat16, FP16: torch.float16}

    def step(precision: str) -> None:
        dtype = dtypes.get(precision)
        autocast = (
            torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_of(model)
        loss.float().backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def model_signature(model: torch.nn.Module) -> str:
    """A short hash of a model's parameter names and shapes (part of a probe's cache key)."""
    shapes = [(name, list(p.shape)) for name, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def cpu_has_bf16_instructions() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_id(device: str) -> dict:
    """What a precision measurement depends on besides the model: the processor (GPU name, or
    CPU model and its bf16 instructions), the torch version and the thread count."""
    if device == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        hardware = f"{_cpu_model()}; bf16 instructions: {cpu_has_bf16_instructions()}"
    return {"hardware": hardware, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def precision_key(device: str, probe: PrecisionProbe) -> str:
    """The cache key of a probe: machine, stage and shape, hashed."""
    what = {"machine": machine_id(device), "stage": probe.stage, "shape": probe.shape}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class PrecisionCache:
    """Measured s/step per precision, by :func:`precision_key`, in one small JSON file.

    Default file: ``$XDG_CACHE_HOME/egoslots/precision.json`` (``~/.cache`` without
    XDG_CACHE_HOME). ``EGOSLOTS_PRECISION_CACHE`` overrides it: a file path, or ``off`` (also
    ``0`` / ``none``) to measure every time. A cache that cannot be read or written is ignored.
    """

    ENV = "EGOSLOTS_PRECISION_CACHE"

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def default(cls) -> PrecisionCache | None:
        env = os.environ.get(cls.ENV)
        if env is not None:
            return None if env.strip().lower() in ("", "0", "off", "none") else cls(Path(env))
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return cls(Path(base) / "egoslots" / "precision.json")

    def _entries(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> dict[str, float] | None:
        times = self._entries().get(key, {}).get("seconds_per_step")
        return {str(k): float(v) for k, v in times.items()} if isinstance(times, dict) else None

    def put(self, key: str, times: dict[str, float]) -> None:
        entries = self._entries()
        entries[key] = {"seconds_per_step": times, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("precision cache %s not written (%s): the probe runs again", self.path, err)
