"""stages/machinery/runtime.py: precision ``auto`` by measurement (probe, cache, explicit settings) and
torch's thread count from the affinity mask and the cgroup CPU quota."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from egoslots.stages.machinery import runtime, speed_probe
from egoslots.stages.machinery.runtime import PrecisionProbe, choose_precision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------
def sleeping_probe(slow: str, calls: list, shape=None) -> PrecisionProbe:
    """A probe whose step sleeps 40 ms in the ``slow`` precision and 2 ms in the others."""

    def make_step():
        def step(precision):
            calls.append(precision)
            time.sleep(0.04 if precision == slow else 0.002)

        return step

    return PrecisionProbe("test", shape or {"n": 1}, make_step, warmup=1, steps=3)


def refusing_probe() -> PrecisionProbe:
    def make_step():
        raise AssertionError("the probe must not run here")

    return PrecisionProbe("test", {"n": 1}, make_step)


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "precision.json"
    monkeypatch.setenv(runtime.PrecisionCache.ENV, str(path))
    monkeypatch.setattr(runtime, "bf16_native", lambda device: True)
    return path


@pytest.mark.parametrize("slow, picked", [("bf16-mixed", "32-true"), ("32-true", "bf16-mixed")])
def test_auto_picks_the_precision_measured_faster(cache_file, slow, picked, caplog):
    calls: list = []
    with caplog.at_level(logging.INFO, logger="egoslots"):
        assert choose_precision("auto", "cpu", sleeping_probe(slow, calls)) == picked
    # warm-up in both, then the timed steps interleaved A B A B A B
    assert calls == ["32-true", "bf16-mixed"] + ["32-true", "bf16-mixed"] * 3
    line = next(r.getMessage() for r in caplog.records if "precision auto" in r.getMessage())
    assert line.startswith(f"precision auto -> {picked} (fp32 ") and "bf16 " in line
    assert line.endswith("probe)")


def test_auto_reuses_the_cached_measurement(cache_file, caplog):
    assert choose_precision("auto", "cpu", sleeping_probe("32-true", [])) == "bf16-mixed"
    stored = json.loads(cache_file.read_text())
    (entry,) = stored.values()
    assert set(entry["seconds_per_step"]) == {"32-true", "bf16-mixed"}
    with caplog.at_level(logging.INFO, logger="egoslots"):
        assert choose_precision("auto", "cpu", refusing_probe()) == "bf16-mixed"
    assert any(r.getMessage().endswith("cached)") for r in caplog.records)
    # another model shape is measured on its own
    calls: list = []
    probe = sleeping_probe("bf16-mixed", calls, shape={"n": 2})
    assert choose_precision("auto", "cpu", probe) == "32-true" and calls
    assert len(json.loads(cache_file.read_text())) == 2


def test_cache_can_be_switched_off(cache_file, monkeypatch):
    monkeypatch.setenv(runtime.PrecisionCache.ENV, "off")
    for _ in range(2):
        calls: list = []
        choose_precision("auto", "cpu", sleeping_probe("32-true", calls))
        assert calls  # measured every time
    assert not cache_file.exists()


def test_cache_defaults_to_the_users_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.PrecisionCache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.PrecisionCache.default().path == tmp_path / "egoslots" / "precision.json"


@pytest.mark.parametrize("bf16, picked", [(1.0, "32-true"), (0.97, "32-true"), (0.9, "bf16-mixed")])
def test_a_mixed_precision_must_win_by_more_than_noise(cache_file, bf16, picked):
    probe = sleeping_probe("nothing", [])
    cache = runtime.PrecisionCache(cache_file)
    cache.put(runtime.precision_key("cpu", probe), {"32-true": 1.0, "bf16-mixed": bf16})
    assert choose_precision("auto", "cpu", refusing_probe()) == picked


def test_explicit_precision_and_stored_precision_skip_the_probe(cache_file):
    assert choose_precision("32", "cpu", refusing_probe()) == "32-true"
    assert choose_precision("bf16-mixed", "cpu", refusing_probe()) == "bf16-mixed"
    assert choose_precision("auto", "cpu", refusing_probe(), stored="bf16-mixed") == "bf16-mixed"
    assert not cache_file.exists()


def test_several_processes_do_not_probe(cache_file, monkeypatch):
    """DDP ranks probing apart could train in different precisions: they skip the probe."""
    assert choose_precision("auto", "cpu", refusing_probe(), several=True) == "32-true"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert not runtime.several_processes(1, 1)
    assert runtime.several_processes(2, 1) and runtime.several_processes(1, 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert runtime.several_processes(1, 1)


def test_no_native_bf16_means_fp32_without_a_probe(cache_file, monkeypatch):
    monkeypatch.setattr(runtime, "bf16_native", lambda device: False)
    assert choose_precision("auto", "cpu", refusing_probe()) == "32-true"


def test_probe_leaves_the_global_rng_as_it_was(cache_file):
    def make_step():
        model = torch.nn.Linear(4, 1)
        return speed_probe.training_step_timer(
            model, lambda m: m(torch.randn(8, 4)).pow(2).mean(), "cpu"
        )

    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    runtime.measure_precisions(PrecisionProbe("t", {}, make_step, 1, 1), ["32-true", "bf16-mixed"])
    assert torch.equal(torch.rand(3), expected)


def test_step_timer_trains_a_copy_not_the_model():
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()
    step = speed_probe.training_step_timer(
        model, lambda m: m(torch.randn(8, 4)).pow(2).mean(), "cpu"
    )
    for precision in ("32-true", "bf16-mixed"):
        step(precision)
    assert torch.equal(model.weight, before)


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------
def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.cgroup_cpu_quota(tmp_path, own="/") is None
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "cpu.max").write_text("150000 100000\n")
    assert runtime.cgroup_cpu_quota(tmp_path, own="/job") == pytest.approx(1.5)
    (tmp_path / "cpu.max").write_text("300000 100000\n")  # a parent's limit counts too
    assert runtime.cgroup_cpu_quota(tmp_path, own="/job") == pytest.approx(1.5)
    assert runtime.cgroup_cpu_quota(tmp_path, own="/") == pytest.approx(3.0)


def test_cgroup_v1_quota(tmp_path):
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime.cgroup_cpu_quota(tmp_path, own="/") is None
    (cpu / "cpu.cfs_quota_us").write_text("200000\n")
    assert runtime.cgroup_cpu_quota(tmp_path, own="/") == pytest.approx(2.0)


def test_default_threads_follow_the_quota_and_workers(tmp_path):
    usable = len(os.sched_getaffinity(0))
    assert runtime.default_threads(0, tmp_path) == usable  # no cgroup files: no limit
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert runtime.default_threads(0, tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{100000 * (usable + 8)} 100000\n")
    assert runtime.default_threads(0, tmp_path) == usable  # the affinity mask is smaller
    assert runtime.default_threads(usable - 1, tmp_path) == 1
    assert runtime.default_threads(usable + 5, tmp_path) == 1  # at least one


CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import torch
from egoslots.stages.machinery.runtime import configure_threads
configure_threads(0, busy_workers=0)
print(torch.get_num_threads())
"""


def test_threads_follow_a_restricted_affinity_mask():
    env = {k: v for k, v in os.environ.items() if k != runtime.THREADS_ENV}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, REPO], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == "1"


def test_thread_overrides(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(runtime.THREADS_ENV, "3")
        assert runtime.configure_threads(0) == 3 and torch.get_num_threads() == 3
        assert runtime.configure_threads(2) == 2  # the config key wins over the variable
        monkeypatch.setenv(runtime.THREADS_ENV, "many")
        with pytest.raises(runtime.ConfigError, match="EGOSLOTS_NUM_THREADS"):
            runtime.configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_the_stages_probes_run_their_own_steps_on_copies():
    """The probes of train-slots and pretrain-dvae build their real models' steps (copies: the
    run's weights do not move) and key the cache by model and batch shape."""
    from egoslots.pipeline.config import load_config, resolve
    from egoslots.stages.machinery.dvae_task import DVAETask
    from egoslots.stages.machinery.dvae_task import precision_probe as dvae_probe
    from egoslots.stages.machinery.slot_task import SlotTrainingModule
    from egoslots.stages.machinery.slot_task import precision_probe as slot_probe
    from tests.helpers.runs import TINY_SLOT_MODEL

    cfg = load_config(None, ["globals.NUM_SLOTS=3", "globals.SLOT_DIM=16", "globals.VOCAB_SIZE=16",
                             *TINY_SLOT_MODEL])  # fmt: skip
    slots = SlotTrainingModule(resolve(cfg), feature_dim=8, num_tokens=16, token_grid=(4, 4))
    dvae = DVAETask(16, 8, 16, 1e-3, 1.0, 0.1, 10)
    probes = [slot_probe(slots, 2, 3, "cpu"), dvae_probe(dvae, 2, "cpu")]
    for module, probe in zip((slots, dvae), probes):
        before = {k: v.clone() for k, v in module.state_dict().items()}
        step = probe.make_step()
        for precision in ("32-true", "bf16-mixed"):
            step(precision)
        assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert probes[0].shape["features"] == (2, 3, 16, 8) and probes[0].shape["tokens"] == (4, 4)
    assert probes[1].shape["frames"] == [2, 3, 16, 16]
    bigger = slot_probe(slots, 4, 3, "cpu")
    assert runtime.precision_key("cpu", bigger) != runtime.precision_key("cpu", probes[0])


# --------------------------------------------------------------------------------------------
# DataLoader workers
# --------------------------------------------------------------------------------------------
def test_a_worker_says_nothing_when_the_main_process_hangs_up_on_its_handle_sharing(capfd):
    """The real handle-sharing thread of multiprocessing, its caller gone mid-handshake (as a
    main process stopped by Ctrl-C leaves it): a traceback without the hook, silence with it,
    and any other uncaught error still printed."""
    import socket
    from multiprocessing import connection, resource_sharer

    def hang_up_on_a_fresh_sharer() -> None:
        sharer = resource_sharer._ResourceSharer()
        address, _key = sharer.register(lambda conn, pid: None, lambda: None)
        with socket.socket(socket.AF_UNIX) as caller:  # the sharer listens on a unix socket
            caller.connect(address)  # connected, then gone before answering the challenge
        sharer.stop(timeout=10)  # joins the serving thread, which has reported by then

    usual_hook = sys.excepthook
    try:
        hang_up_on_a_fresh_sharer()
        leaked = capfd.readouterr().err  # EOFError or BrokenPipeError, by timing
        assert "Traceback" in leaked and "resource_sharer.py" in leaked, leaked

        runtime.quiet_when_the_main_process_hangs_up()
        hang_up_on_a_fresh_sharer()
        assert capfd.readouterr().err == ""

        try:
            raise connection.AuthenticationError("elsewhere")
        except connection.AuthenticationError:
            sys.excepthook(*sys.exc_info())
        assert "AuthenticationError: elsewhere" in capfd.readouterr().err
    finally:
        sys.excepthook = usual_hook
