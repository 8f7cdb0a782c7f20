"""Stage 3 (train-slots): training from tiny cached stores, resume, errors, loading.

Every test builds its own store with random features, frames, masks and token ids; nothing
here runs a ViT or downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from egoslots.cache.store import FeatureStore
from egoslots.pipeline.schedules import lr_factor, warmup_exp_decay
from egoslots.stages.machinery.common import StageError
from egoslots.stages.machinery.slot_task import SlotTrainingModule
from tests.helpers.runs import make_dvae_run, slot_cfg, slot_cfg_args
from tests.helpers.stores import SLOT_DVAE_HASH as DVAE_HASH
from tests.helpers.stores import SLOT_VOCAB as VOCAB
from tests.helpers.stores import slot_store


@pytest.fixture
def work(tmp_path):
    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    return tmp_path


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------- schedule
def test_lr_schedule_warmup_then_halves_by_max_steps():
    f = lr_factor(warmup_steps=10, max_steps=110)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5**0.5)
    assert f(110) == pytest.approx(0.5)
    assert all(f(s) >= f(s + 1) for s in range(10, 200))
    assert warmup_exp_decay(50, 0, 100) == pytest.approx(0.5**0.5)
    assert warmup_exp_decay(500, 10, 100, decay=False) == 1.0
    with pytest.raises(ValueError):
        lr_factor(-1, 10)


def test_lr_schedule_can_decay_further_by_max_steps():
    f = lr_factor(warmup_steps=10, max_steps=110, final_factor=0.02)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.02**0.5)
    assert f(110) == pytest.approx(0.02)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="final_factor"):
            lr_factor(10, 110, final_factor=bad)


def test_param_group_regexes_first_match_wins_and_unmatched_is_an_error():
    from egoslots.stages.machinery.slot_task import build_param_groups

    net = torch.nn.ModuleDict(
        {
            "decoder": torch.nn.Linear(2, 2),
            "grouper": torch.nn.Linear(2, 2),
            "other": torch.nn.Linear(2, 2),
        }
    )
    groups = build_param_groups(
        net.named_parameters(),
        [{"regex": "decoder.*", "lr": 1e-3}, {"regex": "(decoder|grouper)", "lr": 2e-3}],
        base_lr=4e-4,
    )
    by_name = {g["name"]: g for g in groups}
    assert [p.data_ptr() for p in by_name["decoder.*"]["params"]] == [
        p.data_ptr() for p in net["decoder"].parameters()
    ]
    assert (
        len(by_name["(decoder|grouper)"]["params"]) == 2
    )  # only grouper's: decoder went to the first rule
    assert by_name["default"]["lr"] == 4e-4 and len(by_name["default"]["params"]) == 2
    with pytest.raises(StageError, match="encoder"):
        build_param_groups(net.named_parameters(), [{"regex": "encoder.*", "lr": 1e-5}], 4e-4)


def test_resumable_sampler_continues_the_same_stream():
    from egoslots.stages.machinery.training import ResumableRandomSampler

    full = list(ResumableRandomSampler(10, total=200_000, seed=3))
    tail = list(ResumableRandomSampler(10, total=200_000, seed=3, start=70_000))
    assert tail == full[70_000:]
    assert full[:50] != list(ResumableRandomSampler(10, total=50, seed=4))
    assert set(full) == set(range(10))


# ------------------------------------------------------------------------------- training
def test_train_end_to_end_writes_run_dir_and_loads(work):
    from egoslots.stages.machinery.inference import load_trained
    from egoslots.stages.train_slots import train

    run = train(slot_cfg(work))
    ck = run / "checkpoints"
    assert {p.name for p in ck.glob("*.ckpt")} == {"step=2.ckpt", "step=4.ckpt", "last.ckpt"}
    assert (run / "config.yaml").is_file()
    inputs = json.loads((run / "inputs.json").read_text())
    assert inputs["store_fingerprint"] == "fp0" and inputs["dvae_hash"] == DVAE_HASH
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in (
        "train/loss",
        "train/loss_featrec",
        "train/loss_ss",
        "train/loss_steve_ce",
        "train/lr",
        "val/loss",
        "val/fg_ari",
        "val/mbo",
    ):
        assert name in tags, (name, tags)
    assert "slots/masks_over_time" in acc.Tags()["images"]

    # Lightning's own loader, on a batch of cached clips
    module = SlotTrainingModule.load_from_checkpoint(ck / "last.ckpt", map_location="cpu").eval()
    model, cfg, store, token_hash = load_trained(run)
    assert not model.training and token_hash == DVAE_HASH and store.fingerprint == "fp0"
    from egoslots.cache.reader import ClipDataset

    ds = ClipDataset(store, "val", 3, fields=("features", "tokens"), tokens=token_hash)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    with torch.no_grad():
        out = module(batch["features"], batch["tokens"])
    assert out["processor"]["state"].shape == (2, 3, 3, 16)
    assert out["decoder"]["masks"].shape == (2, 3, 3, 16)

    # a finished run returns at once
    mtime = (ck / "last.ckpt").stat().st_mtime
    assert train(slot_cfg(work)) == run
    assert (ck / "last.ckpt").stat().st_mtime == mtime


def test_never_runs_the_vit(work, monkeypatch):
    import timm

    import egoslots.pipeline.backbones
    from egoslots.stages.train_slots import train

    def forbidden(*a, **k):
        raise AssertionError("stage 3 must not build or run a backbone")

    monkeypatch.setattr(timm, "create_model", forbidden)
    monkeypatch.setattr(torch.hub, "load", forbidden)
    monkeypatch.setattr(egoslots.pipeline.backbones, "build_backbone", forbidden)
    run = train(
        slot_cfg(work, "trainer.max_steps=2", "trainer.image_every=100", "trainer.val_every=100")
    )
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "toggles",
    [
        ("globals.USE_STEVE_DECODER=false", "globals.USE_DVAE=false"),
        ("model.loss_weights.loss_ss=0",),
        ("predictor.enabled=false",),
    ],
)
def test_ablations_train_from_the_same_store(tmp_path, toggles):
    from egoslots.stages.train_slots import train

    slot_store(tmp_path, tokens="USE_STEVE_DECODER=false" not in toggles[0])
    if "USE_STEVE_DECODER=false" not in toggles[0]:
        make_dvae_run(tmp_path)
    cfg = slot_cfg(
        tmp_path,
        "trainer.max_steps=2",
        "trainer.image_every=100",
        "trainer.val_every=100",
        *toggles,
    )
    run = train(cfg)
    ck = _weights(run / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 2
    has_steve = any(k.startswith("model.steve") for k in ck["state_dict"])
    assert has_steve == ("USE_STEVE_DECODER=false" not in toggles[0])


def test_overfits_a_tiny_cached_set(tmp_path):
    """Through the Lightning stage: the total loss on the training clips at least halves."""
    from egoslots.stages.train_slots import train

    slot_store(tmp_path, videos=(("a", 4, "train"),), masks=False)
    make_dvae_run(tmp_path)
    cfg = slot_cfg(
        tmp_path,
        "globals.NUM_FRAMES=4",
        "trainer.max_steps=60",
        "trainer.ckpt_every=60",
        "trainer.log_every=50",
        "trainer.image_every=1000",
        "optimizer.warmup_steps=10",
        "optimizer.lr=0.003",
        "steve_decoder.dropout=0.0",
        "trainer.gradient_clip_val=1.0",
    )
    store = FeatureStore.open(tmp_path / "stores" / "fp0.zarr")
    from egoslots.cache.reader import ClipDataset

    batch = torch.utils.data.default_collate(
        [ClipDataset(store, "train", 4, fields=("features", "tokens"), tokens=DVAE_HASH)[0]] * 2
    )

    def total_loss(module):
        module.eval()
        with torch.no_grad():
            return float(module.model.losses(module(batch["features"], batch["tokens"]))["loss"])

    from egoslots.pipeline.config import resolve
    from egoslots.stages.train_slots import build_module, resolve_inputs

    torch.manual_seed(0)
    before = total_loss(build_module(resolve(cfg), resolve_inputs(cfg)))
    run = train(cfg)
    after = total_loss(SlotTrainingModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt"))
    print(f"total loss {before:.3f} -> {after:.3f}")
    assert after <= 0.5 * before, (before, after)


# ------------------------------------------------------------------------------- errors
def test_missing_caches_name_the_stage_to_run(tmp_path):
    from egoslots.stages.train_slots import train

    with pytest.raises(StageError, match="extract-features"):
        train(slot_cfg(tmp_path))
    slot_store(tmp_path, tokens=False)
    with pytest.raises(StageError, match="pretrain-dvae CONFIG"):
        train(slot_cfg(tmp_path))
    run = make_dvae_run(tmp_path)
    with pytest.raises(
        StageError, match=f"no tokens of dVAE {DVAE_HASH} in store fp0.*egoslots tokenize {run}"
    ):
        train(slot_cfg(tmp_path))
    (run / "dvae.json").write_text(
        json.dumps({"hash": DVAE_HASH, "store": "other", "vocab_size": VOCAB})
    )
    with pytest.raises(StageError, match="trained on store other"):
        train(slot_cfg(tmp_path))


def test_changed_config_in_same_run_dir_is_refused(work):
    from egoslots.stages.train_slots import train

    train(slot_cfg(work, "trainer.max_steps=2", "trainer.image_every=100", "trainer.val_every=100"))
    with pytest.raises(StageError, match="globals.NUM_SLOTS|model.num_slots"):
        train(slot_cfg(work, "trainer.max_steps=4", "globals.NUM_SLOTS=4"))


def test_config_changes_name_what_is_trained_and_ignore_retired_keys():
    from egoslots.stages.machinery.rundirs import config_changes

    old = {"globals": {"NUM_SLOTS": 3, "NUM_GPUS": 1}, "trainer": {"max_steps": 2}}
    assert config_changes(old, {"globals": {"NUM_SLOTS": 3}, "trainer": {"max_steps": 9}}) == []
    new = {"globals": {"NUM_SLOTS": 4}, "trainer": {"max_steps": 2}, "seed": 1}
    assert config_changes(old, new) == ["globals.NUM_SLOTS", "seed"]


def test_a_run_from_before_a_key_existed_loads_and_resumes(work):
    """A run trained by an earlier egoslots has no grouper.invariant / grouper.position_embedding
    in its config.yaml nor in its checkpoints. It loads as it was trained (those options off),
    giving the same slots, and resumes under today's config: keys added since, at their
    defaults, are no change; set away from them they still are."""
    import yaml

    from egoslots.stages.machinery.inference import infer_video, load_trained
    from egoslots.stages.train_slots import train

    run = train(slot_cfg(work, "trainer.max_steps=2"))
    model, _, store, _ = load_trained(run)
    features = torch.from_numpy(store.features[: store.videos[0].length]).float()
    before = infer_video(model, features, None, window=3)["slots"]

    def without_new_keys(config: dict) -> dict:
        for key in ("invariant", "position_embedding"):
            del config["grouper"][key]
        del config["evaluate"]["split_parts"]  # added later still
        return config

    saved = run / "config.yaml"
    saved.write_text(yaml.safe_dump(without_new_keys(yaml.safe_load(saved.read_text()))))
    for path in (run / "checkpoints").glob("*.ckpt"):
        ckpt = _weights(path)
        without_new_keys(ckpt["hyper_parameters"]["config"])
        torch.save(ckpt, path)

    model, cfg, _, _ = load_trained(run)  # before: omegaconf's "Missing key invariant"
    assert not model.config.invariant and not model.config.position_embedding
    assert cfg.evaluate.split_parts  # what evaluate reads from the run: today's default
    torch.testing.assert_close(infer_video(model, features, None, window=3)["slots"], before)

    train(slot_cfg(work, "trainer.max_steps=4"))  # resumes: no config change
    assert (run / "checkpoints" / "step=4.ckpt").is_file()
    with pytest.raises(StageError, match="grouper.position_embedding"):
        train(slot_cfg(work, "trainer.max_steps=6", "grouper.position_embedding=true"))


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(work, monkeypatch):
    from egoslots.stages import train_slots

    real = SlotTrainingModule._step
    calls = {"n": 0}

    def poisoned(self, batch):
        outputs, losses = real(self, batch)
        calls["n"] += 1
        if self.training and self.global_step >= 2:
            losses = dict(losses, loss=losses["loss"] * float("nan"))
        return outputs, losses

    monkeypatch.setattr(SlotTrainingModule, "_step", poisoned)
    cfg = slot_cfg(
        work,
        "trainer.max_steps=6",
        "trainer.log_every=2",
        "trainer.val_every=100",
        "trainer.image_every=100",
    )
    with pytest.raises(StageError, match="NaN/inf at step 3"):
        train_slots.train(cfg)
    ck = work / "runs" / "t" / "checkpoints"
    assert _weights(ck / "last.ckpt")["global_step"] == 2
    assert not (ck / "step=4.ckpt").exists()
    sd = _weights(ck / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_cli_train_slots_help_and_run(work, repo_root):
    from click.testing import CliRunner

    from egoslots import cli

    runner = CliRunner()
    res = runner.invoke(cli.main, ["train-slots", "--help"])
    assert res.exit_code == 0 and "egoslots train-slots" in res.output and "--resume" in res.output
    cfg_file = work / "c.yaml"
    cfg_file.write_text("globals:\n  NUM_SLOTS: 3\n")
    args = [a for a in slot_cfg_args(work)]
    res = runner.invoke(cli.main, ["train-slots", str(cfg_file), *args, "trainer.max_steps=2"])
    assert res.exit_code == 0, res.output
    assert (work / "runs" / "t" / "checkpoints" / "last.ckpt").is_file()
    res = runner.invoke(
        cli.main,
        [
            "train-slots",
            str(cfg_file),
            *args,
            "trainer.max_steps=3",
            "--resume",
            str(work / "nope.ckpt"),
        ],
    )
    assert res.exit_code != 0 and "nope.ckpt" in res.output


def test_resumed_auto_run_keeps_the_precision_stored_in_its_checkpoint(work, monkeypatch):
    """precision auto measures once: the resumed run trains in what its checkpoint recorded,
    even when a new measurement would now pick the other precision."""
    from egoslots.stages.machinery import runtime
    from egoslots.stages.train_slots import train

    monkeypatch.setenv("EGOSLOTS_PRECISION_CACHE", "off")
    monkeypatch.setattr(runtime, "bf16_native", lambda device: True)
    monkeypatch.setattr(
        runtime, "measure_precisions", lambda probe, ps: {"32-true": 2.0, "bf16-mixed": 1.0}
    )
    args = ("trainer.precision=auto", "trainer.val_every=100", "trainer.image_every=100")
    run = train(slot_cfg(work, "trainer.max_steps=2", *args))
    assert _weights(run / "checkpoints" / "last.ckpt")["egoslots_precision"] == "bf16-mixed"

    def measured_again(probe, ps):
        raise AssertionError("a resumed run must not measure again")

    monkeypatch.setattr(runtime, "measure_precisions", measured_again)
    run = train(slot_cfg(work, "trainer.max_steps=4", *args))
    last = _weights(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and last["egoslots_precision"] == "bf16-mixed"


def test_training_step_never_syncs_host_and_device(work, monkeypatch):
    """No .item()/bool()/float() of a tensor inside the step (they would stall a GPU)."""
    from egoslots.stages import train_slots

    inside = {"on": False}
    real_step = SlotTrainingModule.training_step

    def watched(self, batch, batch_idx):
        inside["on"] = True
        try:
            return real_step(self, batch, batch_idx)
        finally:
            inside["on"] = False

    def guard(name):
        real = getattr(torch.Tensor, name)

        def check(self, *a, **k):
            if inside["on"]:
                raise AssertionError(f"Tensor.{name} inside training_step: a host-device sync")
            return real(self, *a, **k)

        return check

    for name in ("item", "__bool__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    monkeypatch.setattr(SlotTrainingModule, "training_step", watched)
    run = train_slots.train(
        slot_cfg(work, "trainer.max_steps=2", "trainer.val_every=100", "trainer.image_every=100")
    )
    assert _weights(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_bf16_mixed_trains_where_native(work):
    from egoslots.stages.machinery.runtime import bf16_native
    from egoslots.stages.train_slots import train

    if not bf16_native("cpu"):
        pytest.skip("this CPU has no native bf16 (AVX-512 BF16 / AMX): bf16 would be emulated")
    run = train(
        slot_cfg(
            work,
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=2",
            "trainer.val_every=100",
            "trainer.image_every=100",
        )
    )
    sd = _weights(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(
        v.dtype == torch.float32 for v in sd.values() if v.is_floating_point()
    )  # fp32 master weights


def test_train_slots_schedule_reads_optimizer_decay_final():
    from egoslots.pipeline.config import load_config, resolve
    from tests.helpers.runs import TINY_SLOT_MODEL

    cfg = load_config(None, ["globals.NUM_SLOTS=3", "globals.SLOT_DIM=16", "globals.VOCAB_SIZE=16",
                             "optimizer.warmup_steps=10", "trainer.max_steps=110",
                             "optimizer.decay_final=0.05", *TINY_SLOT_MODEL])  # fmt: skip
    module = SlotTrainingModule(resolve(cfg), feature_dim=8, num_tokens=16, token_grid=(4, 4))
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factor = scheduler.lr_lambdas[0]
    assert factor(110) == pytest.approx(0.05) and factor(60) == pytest.approx(0.05**0.5)


@pytest.mark.parametrize("detach", [False, True])
def test_detached_steve_decoder_is_clipped_apart_from_the_slots(detach):
    """steve_decoder.detach_slots: the decoder's large gradient must not shrink the slots' step
    through a shared clipping norm; each part is clipped on its own norm. Without it, Lightning
    clips one norm over all parameters (SlotContrast's clipping)."""
    from egoslots.pipeline.config import load_config, resolve
    from tests.helpers.runs import TINY_SLOT_MODEL

    cfg = load_config(None, ["globals.NUM_SLOTS=3", "globals.SLOT_DIM=16", "globals.VOCAB_SIZE=16",
                             f"steve_decoder.detach_slots={str(detach).lower()}",
                             *TINY_SLOT_MODEL])  # fmt: skip
    module = SlotTrainingModule(resolve(cfg), feature_dim=8, num_tokens=16, token_grid=(4, 4))
    lightning_clips = []
    module.clip_gradients = lambda *args: lightning_clips.append(args)  # needs a trainer
    steve_ids = {id(p) for p in module.model.steve.parameters()}
    for p in module.model.parameters():  # slots: a norm under 1; the decoder: far over 1
        p.grad = torch.full_like(p, 1e-4 if id(p) not in steve_ids else 10.0)
    before = {id(p): p.grad.clone() for p in module.model.parameters()}
    module.configure_gradient_clipping("optimizer", 1.0, "norm")
    if not detach:
        assert lightning_clips == [("optimizer", 1.0, "norm")]
        return
    assert not lightning_clips
    slots = [p for p in module.model.parameters() if id(p) not in steve_ids]
    steve = [p.grad.norm() for p in module.model.parameters() if id(p) in steve_ids]
    assert all(torch.equal(p.grad, before[id(p)]) for p in slots)
    steve_norm = torch.linalg.vector_norm(torch.stack(steve))
    torch.testing.assert_close(steve_norm, torch.tensor(1.0), rtol=1e-4, atol=1e-4)
