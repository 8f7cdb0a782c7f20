"""Where and how fast a stage computes: device, precision and threads, for every stage.

One place for these rules, so that every stage decides the same way on the same machine:

- Device: ``auto`` is this process's GPU (``LOCAL_RANK`` under torchrun) if there is one, else
  the CPU (:func:`pick_device`); Lightning stages map their ``accelerator`` to the same
  (:func:`device_type`).
- bf16 counts only where it runs natively (:func:`bf16_native`): GPUs whose bf16 is not emulated
  (so not a V100 or T4), CPUs with AVX-512 BF16 or AMX instructions; a tiny probe must then
  give right bf16 results.
- Precision ``auto`` of the training stages (:func:`choose_precision`) is decided by
  measurement, not by a rule: native bf16 on a CPU is 4x faster for some models and slower for
  others (small matmuls, convolutions). A short probe times the stage's own training step in
  fp32 and bf16-mixed (on a GPU without native bf16: 16-mixed), interleaved, and keeps the faster
  one, never anything slower than fp32. The answer is cached per machine and model shape
  (:class:`PrecisionCache`), and a resumed run reuses the precision stored in its checkpoint.
  Extraction's ``compute: auto`` stays a rule (:func:`extraction_compute`): it is part of the
  store's fingerprint, which must not depend on a timing.
- TF32 matmuls on GPUs (:func:`set_fast_math`).
- Threads (:func:`configure_threads`): torch's intra-op threads default to the CPUs this process
  may use (affinity mask and cgroup CPU quota) minus the DataLoader workers that keep a core
  busy beside it (extraction's decoders), so OpenMP threads never spin against each other on
  an oversubscribed machine or a cluster node whose quota is below its core count; override
  with the config's ``num_threads`` or ``EGOSLOTS_NUM_THREADS``. Workers run one torch thread
  each (:func:`one_thread_per_worker`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from pathlib import Path

import torch

from egoslots.pipeline.config import ConfigError
from egoslots.stages.machinery.speed_probe import (
    BF16,
    FP16,
    FP32,
    PrecisionCache,
    PrecisionProbe,
    cpu_has_bf16_instructions,
    measure_precisions,
    precision_key,
)

log = logging.getLogger("egoslots")

COMPUTE_CHOICES = ("auto", "fp32", "bf16")


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------
def pick_device(name: str = "auto", key: str = "device") -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU;
    anything else is a torch device name (cpu, cuda, cuda:1, ...), refused with one ConfigError
    naming ``key`` when this machine does not have it."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise ConfigError(
                f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:N"
            ) from err
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ConfigError(
                    f"{key}={name}: torch sees no GPU on this machine (torch.cuda.is_available() "
                    f"is False); use {key}=auto or cpu"
                )
            if device.index is not None and device.index >= count:
                raise ConfigError(
                    f"{key}={name}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})"
                )
        return device
    if torch.cuda.is_available():
        return torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        )
    return torch.device("cpu")


def device_type(accelerator: str) -> str:
    """The device type a Lightning ``accelerator`` setting trains on here: cuda or cpu."""
    if str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------
def bf16_native(device_type: str) -> bool:
    """Whether bf16 runs natively (not emulated) on this machine's ``device_type`` device:
    checked, then probed with a tiny autocast matmul (drawn from a generator of its own: the
    global RNG, and so a run's initial weights, do not depend on whether this ran)."""
    if device_type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False
        )
    elif device_type == "cpu":
        native = cpu_has_bf16_instructions()
    else:
        native = False
    if not native:
        return False
    try:
        g = torch.Generator(device=device_type).manual_seed(0)
        a = torch.randn(16, 16, device=device_type, generator=g)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            c = a @ a
        return c.dtype == torch.bfloat16 and torch.allclose(c.float(), a @ a, atol=0.5, rtol=0.05)
    except Exception:  # noqa: BLE001 - any failure means "don't use it"
        return False


# A mixed precision is chosen only when its probe step is at least 5 % faster than fp32's:
# closer than that is within a short probe's noise on a shared machine, and fp32 is exact.
MARGIN = 0.95


def lightning_precision(setting: str, device: str) -> str:
    """An explicit ``precision`` setting -> a Lightning precision string (``auto`` is
    :func:`choose_precision`'s job).

    ``32`` / ``fp32`` / ``32-true`` and ``bf16`` / ``bf16-mixed`` are the usual names (bf16
    where it is not native is slow: a warning says so); anything else is passed to Lightning as
    it is (``16-mixed``, ...).
    """
    setting = str(setting)
    if setting in ("32", "32-true", "fp32"):
        return FP32
    if setting in ("bf16", "bf16-mixed"):
        if not bf16_native(device):
            log.warning(
                "precision %s: bf16 is not native on this %s; it will be slow", setting, device
            )
        return BF16
    return setting


def several_processes(devices, num_nodes) -> bool:
    """Whether a training stage runs as several processes (DDP): its ranks must then agree on
    the precision, which separate probes cannot promise."""
    launched = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1) > 1
    return launched or int(num_nodes) > 1 or str(devices) not in ("1", "[0]", "cpu")


def choose_precision(
    setting: str,
    device: str,
    probe: PrecisionProbe | None,
    stored: str | None = None,
    several: bool = False,
) -> str:
    """A training stage's ``precision`` setting -> the Lightning precision it trains in.

    Explicit settings are :func:`lightning_precision`'s. ``auto``: the precision ``stored`` with
    the run being resumed (so a resumed run never depends on a new measurement); else fp32
    where no faster candidate exists (no native bf16 on a CPU), bf16-mixed on a GPU with native
    bf16; else whichever of fp32 and the candidate (bf16-mixed on a CPU, 16-mixed on an older
    GPU) ``probe`` measures faster, from the cache when this machine measured this shape before.
    ``several`` processes (:func:`several_processes`) skip the probe and train in fp32 there.
    """
    if str(setting) != "auto":
        return lightning_precision(setting, device)
    if stored:
        log.info("precision auto -> %s (stored with the run being resumed)", stored)
        return stored
    if device == "cuda" and bf16_native(device):
        log.info("precision auto -> %s (native bf16 on this GPU)", BF16)
        return BF16
    candidate = FP16 if device == "cuda" else BF16 if bf16_native(device) else None
    if candidate is None or probe is None:
        log.info("precision auto -> %s (no native bf16 on this %s)", FP32, device)
        return FP32
    if several:
        log.info(
            "precision auto -> %s (several processes: their precision must agree, so no probe; "
            "set the precision to %s to try it)",
            FP32,
            candidate,
        )
        return FP32
    cache = PrecisionCache.default()
    key = precision_key(device, probe)
    times, how = (cache.get(key) if cache else None), "cached"
    if times is None:
        times, how = measure_precisions(probe, [FP32, candidate]), "probe"
        if cache:
            cache.put(key, times)
    fastest = min(times, key=times.get)
    # never slower than fp32: a candidate must win by more than the probe's noise
    choice = fastest if times[fastest] < MARGIN * times[FP32] else FP32
    log.info(
        "precision auto -> %s (%s, %s)",
        choice,
        ", ".join(f"{_short(p)} {t:.3g} s/step" for p, t in times.items()),
        how,
    )
    return choice


def _short(precision: str) -> str:
    return {FP32: "fp32", BF16: "bf16", FP16: "fp16"}.get(precision, precision)


def extraction_compute(requested: str, device: torch.device) -> str:
    """``extract.compute`` (auto | fp32 | bf16) -> the dtype actually used: bf16 only where it is
    native (:func:`bf16_native`). It is part of the store's fingerprint."""
    if requested not in COMPUTE_CHOICES:
        raise ConfigError(
            f"extract.compute={requested!r}: choose one of {', '.join(COMPUTE_CHOICES)}"
        )
    if requested == "fp32":
        return "fp32"
    if bf16_native(device.type):
        return "bf16"
    if requested == "bf16":
        log.warning(
            "extract.compute=bf16 requested but bf16 is not native on this %s: computing in fp32",
            device.type,
        )
    return "fp32"


def set_fast_math(enabled: bool) -> None:
    """TF32 matmuls and convolutions on GPUs (fp32 range, 10-bit mantissa)."""
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------
def one_thread_per_worker(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn`` part: a worker decodes and copies with one torch thread, so
    the workers never fight the model's threads for cores."""
    torch.set_num_threads(1)


def quiet_when_the_main_process_hangs_up(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn`` part: no traceback when the main process stops mid-batch.

    A worker hands each batch's shared memory to the main process over a socket, served by
    multiprocessing's handle-sharing thread (``multiprocessing/resource_sharer.py``). A main
    process stopped by Ctrl-C or SIGTERM in the middle of that handshake closes the socket, and
    the worker's thread printed an ``EOFError`` traceback beneath egoslots' one-line message. Its
    errors are dropped here: when the main process still runs, it raises its own error for the
    batch that did not arrive. Any other uncaught error still goes to the usual hook.
    """
    usual_hook = sys.excepthook

    def hook(kind, value, traceback) -> None:
        if issubclass(kind, (EOFError, OSError)) and _raised_in_handle_sharing(traceback):
            return
        usual_hook(kind, value, traceback)

    sys.excepthook = hook


def _raised_in_handle_sharing(traceback) -> bool:
    while traceback is not None:
        if Path(traceback.tb_frame.f_code.co_filename).name == "resource_sharer.py":
            return True
        traceback = traceback.tb_next
    return False


THREADS_ENV = "EGOSLOTS_NUM_THREADS"


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), own: str | None = None) -> float | None:
    """The CPUs this process's cgroup may use (quota / period), or None without a limit.

    cgroup v2: ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"); v1: ``cpu.cfs_quota_us`` (-1: no
    limit) and ``cpu.cfs_period_us``, under ``root/cpu`` or ``root/cpu,cpuacct``. Checked in
    this process's own cgroup (``own``, from /proc/self/cgroup when None) and every parent up to
    ``root``; the smallest limit wins.
    """
    limits = []
    for base in (root, root / "cpu", root / "cpu,cpuacct"):
        for folder in _cgroup_chain(base, own):
            limit = _cpu_limit_in(folder)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _cgroup_chain(base: Path, own: str | None) -> list[Path]:
    if own is None:
        own = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                hierarchy, _, path = line.split(":", 2)
                if hierarchy == "0" or "cpu" in hierarchy.split(","):
                    own = path
                    break
    parts = [p for p in own.strip("/").split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _cpu_limit_in(folder: Path) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota
    (rounded down: 1.5 CPUs of quota run 1 busy thread without being throttled), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def default_threads(busy_workers: int = 0, root: Path = Path("/sys/fs/cgroup")) -> int:
    """torch's intra-op threads by default: the usable CPUs less the DataLoader workers that
    keep a core busy beside the model (``busy_workers``), at least 1."""
    return max(1, usable_cpus(root) - max(0, int(busy_workers)))


def configure_threads(setting: int | None = 0, busy_workers: int = 0) -> int:
    """Set torch's intra-op threads for a stage; returns the number.

    ``setting`` (the config's ``num_threads``) if > 0, else ``EGOSLOTS_NUM_THREADS`` if set,
    else :func:`default_threads`. ``busy_workers``: the DataLoader workers that compute beside
    the model. Extraction's decoders do (decoding and resizing video takes a core each); the
    training stages' cache readers do not: they read a batch in milliseconds (preadv into
    shared memory, docs/benchmarks.md) and then sleep on a full prefetch queue while a step
    takes 100-1000x longer, so counting them would halve the threads of a 2-CPU machine for
    nothing.
    """
    env = os.environ.get(THREADS_ENV, "").strip()
    if setting and int(setting) > 0:
        threads, why = int(setting), "num_threads"
    elif env:
        try:
            threads, why = max(1, int(env)), THREADS_ENV
        except ValueError:
            raise ConfigError(f"{THREADS_ENV}={env!r}: give a whole number of threads") from None
    else:
        threads = default_threads(busy_workers)
        why = f"{usable_cpus()} usable CPUs, {busy_workers} busy DataLoader workers"
    torch.set_num_threads(threads)
    log.info("torch threads: %d (%s)", threads, why)
    return threads
