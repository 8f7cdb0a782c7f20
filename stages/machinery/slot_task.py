"""The LightningModule of train-slots: the slot model, its optimizer, schedule and logging.

:class:`SlotTrainingModule` wraps :class:`egoslots.pipeline.model.SlotModel` (built from the config saved
as its hyperparameters, with the store's shapes) and trains it on batches of cached clips
(``stages/machinery/datamodules.ClipData``): losses to TensorBoard (``train/loss*``, ``train/lr``,
``val/*`` with validation FG-ARI / mBO where masks exist), Adam with per-module learning rates
(:func:`build_param_groups`) and warmup + decay. The data, the NaN guard and the pictures are
not here (``stages/machinery/datamodules.py``, ``stages/machinery/callbacks.py``).
"""

from __future__ import annotations

import math
import re

import lightning as L
import torch

from egoslots.pipeline.config import with_keys_added_since
from egoslots.pipeline.metrics import evaluate_masks
from egoslots.pipeline.model import SlotModel
from egoslots.pipeline.schedules import lr_factor
from egoslots.stages.machinery.callbacks import add_loss_watch, watch_loss
from egoslots.stages.machinery.common import StageError
from egoslots.stages.machinery.speed_probe import (
    PrecisionProbe,
    model_signature,
    training_step_timer,
)
from egoslots.stages.machinery.training import gather_with_grad


def build_param_groups(named_parameters, groups_cfg, base_lr: float) -> list[dict]:
    """Adam parameter groups from ``optimizer.param_groups`` ({regex, lr}, first match wins).

    Regexes are matched (``re.match``, anchored at the start) against parameter names of the
    slot model (e.g. ``decoder.mlp.0.weight``). Unmatched parameters use ``base_lr``; a regex
    that matches nothing is an error naming it.
    """
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    rules = []
    for i, g in enumerate(groups_cfg or []):
        try:
            rules.append((re.compile(str(g["regex"])), float(g["lr"]), str(g["regex"])))
        except re.error as err:
            raise StageError(
                f"optimizer.param_groups[{i}].regex '{g['regex']}' is not a valid regex: {err}"
            ) from err
    buckets: list[list] = [[] for _ in rules]
    rest = []
    for name, p in named:
        for i, (rx, _, _) in enumerate(rules):
            if rx.match(name):
                buckets[i].append(p)
                break
        else:
            rest.append(p)
    for i, (_, _, text) in enumerate(rules):
        if not buckets[i]:
            tops = sorted({n.split(".")[0] for n, _ in named})
            raise StageError(
                f"optimizer.param_groups[{i}].regex '{text}' matches no trainable parameter "
                f"(or only ones an earlier group took); parameter names start with: {', '.join(tops)}"
            )
    groups = [{"params": ps, "lr": lr, "name": text} for (_, lr, text), ps in zip(rules, buckets)]
    if rest:
        groups.append({"params": rest, "lr": float(base_lr), "name": "default"})
    return groups


class SlotTrainingModule(L.LightningModule):
    """SlotModel + its optimizer, schedule and logging; runs on batches of cached clips.

    Load a trained one with ``SlotTrainingModule.load_from_checkpoint(path)``: the resolved
    config and the store's shapes are saved as hyperparameters, so nothing else is needed.
    A batch is a dict with ``features`` (B, T, N, F) and, with the STEVE decoder, ``tokens``
    (B, T, h, w) token ids.
    """

    def __init__(
        self, config: dict, feature_dim: int, num_tokens: int, token_grid: tuple | None = None
    ):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = with_keys_added_since(config)  # a run trained before a key existed loads
        grid = tuple(token_grid) if token_grid is not None else None
        self.model = SlotModel.from_config(self.cfg, feature_dim, num_tokens, grid)
        add_loss_watch(self)  # the first step whose loss was not finite, for the LossGuard

    # ------------------------------------------------------------------ model
    def forward(self, features: torch.Tensor, tokens: torch.Tensor | None = None) -> dict:
        return self.model(features, tokens)

    def _step(self, batch: dict) -> tuple[dict, dict]:
        # Clips arrive in the store's dtype (float16: half the bytes through the loader); widened
        # here, on the training device, to exactly the float32 values the store holds.
        outputs = self.model(batch["features"].float(), batch.get("tokens"))
        return outputs, self.model.losses(outputs, gather=self._gather())

    def _gather(self):
        """DDP with losses.loss_ss.all_gather: contrast slots against the global batch."""
        if (
            not self.cfg.losses.loss_ss.all_gather
            or self._trainer is None
            or self.trainer.world_size == 1
        ):
            return None
        return gather_with_grad  # (B, T, K, D) -> (world*B, T, K, D)

    def on_train_batch_start(self, batch, batch_idx):
        # Dropout and sampled slot inits draw from a stream seeded by the step: a resumed run
        # draws what the uninterrupted run drew.
        rank = self.global_rank if self.trainer is not None else 0
        torch.manual_seed(int(self.cfg.seed) * 1_000_003 + self.global_step * 1009 + rank)

    def training_step(self, batch: dict, batch_idx: int):
        _, losses = self._step(batch)
        loss = losses["loss"]
        watch_loss(self, loss)
        size = batch["features"].shape[0]
        # Under DDP the logged losses are the mean over ranks (= the global batch's losses).
        sync = self._trainer is not None and self.trainer.world_size > 1
        self._log_losses("train", losses, size, sync)
        self.log(
            "loss",
            loss.detach().float(),
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            logger=False,
            batch_size=size,
            sync_dist=sync,
        )
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        if opt is not None:
            self.log(
                "train/lr",
                float(opt.param_groups[-1]["lr"]),
                on_step=True,
                on_epoch=False,
                batch_size=size,
            )
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        outputs, losses = self._step(batch)
        size = batch["features"].shape[0]
        self._log_losses("val", losses, size, sync=True)
        if "masks" in batch:
            for key, name in (("decoder", ""), ("corrector", "_corrector")):
                scores = clip_metrics(outputs, batch["masks"], key, self.store_grid)
                for metric, values in scores.items():
                    self.log(
                        f"val/{metric}{name}",
                        values.mean(),
                        on_step=False,
                        on_epoch=True,
                        batch_size=size,
                        sync_dist=True,
                    )

    def _log_losses(self, split: str, losses: dict, size: int, sync: bool) -> None:
        """Every loss as ``{split}/{name}``: per step in training, per epoch in validation."""
        per_step = split == "train"
        self.log_dict(
            {f"{split}/{k}": v.detach().float() for k, v in losses.items()},
            on_step=per_step,
            on_epoch=not per_step,
            batch_size=size,
            sync_dist=sync,
        )

    @property
    def store_grid(self) -> tuple[int, int]:
        n = int(self.hparams.num_tokens)
        side = int(round(math.sqrt(n)))
        return (side, n // side)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        opt_cfg = self.cfg.optimizer
        groups = build_param_groups(self.model.named_parameters(), opt_cfg.param_groups, opt_cfg.lr)
        fused = self.device.type == "cuda"
        optimizer = torch.optim.Adam(groups, lr=float(opt_cfg.lr), fused=fused or None)
        factor = lr_factor(
            int(opt_cfg.warmup_steps),
            int(self.cfg.trainer.max_steps),
            bool(opt_cfg.decay),
            float(opt_cfg.get("decay_final", 0.5)),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """trainer.gradient_clip_val over all parameters at once, as SlotContrast clips; with
        steve_decoder.detach_slots, the slot model and the STEVE decoder are clipped each on
        its own norm, so the decoder's (much larger) gradient does not shrink the slots' step."""
        if not gradient_clip_val:
            return
        separate = self.model.steve is not None and self.model.config.steve_detach_slots
        if not separate or gradient_clip_algorithm == "value":  # value clipping: per element
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for part in self.model.parameter_parts():  # parameters without a gradient are skipped
            torch.nn.utils.clip_grad_norm_(part, float(gradient_clip_val))

    def on_train_start(self):
        # A run resumed with a new optimizer.lr / param-group lr uses the new rates: the restored
        # scheduler would otherwise keep the checkpoint's base rates.
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            groups = sched.optimizer.param_groups
            wanted = {
                g["name"]: g["lr"]
                for g in build_param_groups(
                    self.model.named_parameters(),
                    self.cfg.optimizer.param_groups,
                    self.cfg.optimizer.lr,
                )
            }
            for i, group in enumerate(groups):
                if group.get("name") in wanted:
                    sched.base_lrs[i] = wanted[group["name"]]
                    group["initial_lr"] = wanted[group["name"]]
                    group["lr"] = wanted[group["name"]] * sched.lr_lambdas[i](sched.last_epoch)


def clip_metrics(outputs: dict, masks: torch.Tensor, key: str, grid) -> dict:
    """Video FG-ARI and mBO of each clip (NaN values, e.g. no objects, left out)."""
    pred = (
        outputs["decoder"]["masks"]
        if key == "decoder"
        else outputs["processor"]["corrector"]["masks"]
    )
    pred = pred.detach().float().cpu()
    masks = masks.cpu()
    ari, mbo = [], []
    for b in range(pred.shape[0]):
        m = evaluate_masks(pred[b], masks[b], grid)
        ari.append(m["video_fg_ari"])
        mbo.append(m["video_mbo"])
    to_t = lambda v: torch.tensor([x for x in v if x == x] or [float("nan")])  # noqa: E731 (drop NaN)
    return {"fg_ari": to_t(ari), "mbo": to_t(mbo)}


def precision_probe(module: SlotTrainingModule, batch: int, frames: int, device: str):
    """``trainer.precision: auto``'s probe: this run's own training step (a copy of its model,
    random clips of its batch shape) in each precision (``stages/machinery/runtime.choose_precision``)."""
    hp, model = module.hparams, module.model
    feature_shape = (batch, frames, int(hp.num_tokens), int(hp.feature_dim))
    grid = tuple(hp.token_grid) if hp.token_grid is not None else None

    def make_step():
        features = torch.randn(feature_shape, device=device)
        vocab = int(module.cfg.dvae.vocab_size)
        tokens = (
            None if grid is None else torch.randint(vocab, (batch, frames, *grid), device=device)
        )

        def loss_of(m):
            return m.losses(m(features, tokens))["loss"]

        return training_step_timer(model, loss_of, device)

    shape = {"model": model_signature(model), "features": feature_shape, "tokens": grid}
    return PrecisionProbe("train-slots", shape, make_step)
