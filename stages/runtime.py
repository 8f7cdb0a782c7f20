"""Where and how fast a stage computes: device, precision and threads, for every stage.

One place for these rules, so that every stage decides the same way on the same machine:

- Device: ``auto`` is this process's GPU (``LOCAL_RANK`` under torchrun) if there is one, else
  the CPU (:func:`pick_device`); Lightning stages map their ``accelerator`` to the same
  (:func:`device_type`).
- bf16 counts only where it runs natively (:func:`bf16_native`): GPUs whose bf16 is not emulated
  (so not a V100 or T4), CPUs with AVX-512 BF16 or AMX instructions; a tiny probe must then
  give right bf16 results.
- Precision ``auto`` (:func:`lightning_precision`): bf16-mixed where native, else fp32; on a CPU
  only for stage 3 (``cpu_bf16``): stage 2's convolutions have no measured gain there.
  Extraction's ``compute: auto`` follows the same native check (:func:`extraction_compute`).
- TF32 matmuls on GPUs (:func:`set_fast_math`); DataLoader workers run one torch thread each, so
  they never compete with the model for cores (:func:`one_thread_per_worker`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pipeline.config import ConfigError

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
    checked, then probed with a tiny autocast matmul.

    The probe draws its 16x16 matrix from the global RNG (as stage 3 always has, after seeding
    and before building the model): a run's initial weights depend on it, so it is not cached.
    """
    if device_type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False
        )
    elif device_type == "cpu":
        native = _cpu_has_bf16_instructions()
    else:
        native = False
    if not native:
        return False
    try:
        a = torch.randn(16, 16, device=device_type)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            c = a @ a
        return c.dtype == torch.bfloat16 and torch.allclose(c.float(), a @ a, atol=0.5, rtol=0.05)
    except Exception:  # noqa: BLE001 - any failure means "don't use it"
        return False


def _cpu_has_bf16_instructions() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lightning_precision(setting: str, device: str, cpu_bf16: bool = True) -> str:
    """A stage's ``precision`` setting -> a Lightning precision string.

    ``auto``: ``bf16-mixed`` where bf16 is native on ``device`` (on a CPU only if ``cpu_bf16``),
    else ``32-true``. ``32`` / ``fp32`` / ``32-true`` and ``bf16`` / ``bf16-mixed`` are the
    usual names (bf16 where it is not native is slow: a warning says so); anything else is
    passed to Lightning as it is (``16-mixed``, ...).
    """
    setting = str(setting)
    if setting == "auto":
        use_bf16 = (device != "cpu" or cpu_bf16) and bf16_native(device)
        return "bf16-mixed" if use_bf16 else "32-true"
    if setting in ("32", "32-true", "fp32"):
        return "32-true"
    if setting in ("bf16", "bf16-mixed"):
        if not bf16_native(device):
            log.warning(
                "precision %s: bf16 is not native on this %s; it will be slow", setting, device
            )
        return "bf16-mixed"
    return setting


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
