"""The `egoslots` command line: one click group, every stage a subcommand.

Commands are imported lazily so that `egoslots --help` is instant and one stage's heavy
imports (torch, pybullet, ...) never slow another. Each entry names the module that defines
the click command and the one-line description shown in `egoslots --help`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

# name -> (module:attribute, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-synthetic": (
        "egoslots.stages.make_synthetic:make_synthetic",
        "Generate MOVi-like synthetic videos with masks (pybullet).",
    ),
    "inspect-data": (
        "egoslots.stages.inspect_data:inspect_data",
        "Summarise a dataset: videos, frames, splits, masks.",
    ),
    "pretrain-encoder": (
        "egoslots.stages.pretrain_encoder:pretrain_encoder",
        "Stage 0 (optional): train a ViT with DINO on your own frames.",
    ),
    "extract-features": (
        "egoslots.stages.extract_features:extract_features",
        "Stage 1: run the frozen backbone once and cache features.",
    ),
    "cache": ("egoslots.stages.cache:cache", "List, describe, verify or remove feature stores."),
    "pretrain-dvae": (
        "egoslots.stages.pretrain_dvae:pretrain_dvae",
        "Stage 2: train STEVE's dVAE on cached frames, then tokenize.",
    ),
    "tokenize": (
        "egoslots.stages.tokenize:tokenize",
        "Stage 2: write a trained dVAE's token ids into the store.",
    ),
    "train-slots": (
        "egoslots.stages.train_slots:train_slots",
        "Stage 3: train the slot model from cached features and tokens.",
    ),
    "evaluate": (
        "egoslots.stages.evaluate:evaluate",
        "FG-ARI / mBO of a trained run against ground truth, with baselines.",
    ),
    "export-slots": (
        "egoslots.stages.export_slots:export_slots_command",
        "Export per-frame slots, masks and tokens for downstream use.",
    ),
    "infer": (
        "egoslots.stages.infer:infer",
        "Run a trained slot model on new video (no store): slots, masks, overlay, timeline.",
    ),
    "visualize": (
        "egoslots.stages.visualize:visualize",
        "Render slot masks over a video as GIF and PNG strip.",
    ),
    "run": (
        "egoslots.stages.run:run",
        "Run the whole pipeline in order, skipping finished stages.",
    ),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, short = COMMANDS[name]
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        command.short_help = short
        return command

    def invoke(self, ctx):
        """Run the command inside the one handler of failed writes and bad input
        (``egoslots.stages.machinery.common.one_line_errors``): one ``Error:`` line, no traceback."""
        from egoslots.stages.machinery.common import one_line_errors

        with one_line_errors():
            return super().invoke(ctx)

    def format_commands(self, ctx, formatter):
        rows = [(name, short) for name, (_, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="egoslots")
def main():
    """egoslots: object-centric learning on egocentric video.

    A staged pipeline: [pretrain-encoder ->] extract-features (frozen ViT, once) -> pretrain-dvae (tokens) ->
    train-slots -> evaluate. Every stage reads a YAML config plus key=value overrides:

    \b
      egoslots run configs/demo.yaml
      egoslots train-slots configs/base.yaml globals.NUM_SLOTS=10
    """


def _import_this_checkout() -> None:
    """`python cli.py ...` in a checkout runs that checkout, whichever egoslots is installed:
    this folder is imported as the package `egoslots` (the crash tests rely on it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "egoslots", os.path.join(here, "__init__.py"), submodule_search_locations=[here]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["egoslots"] = package
    spec.loader.exec_module(package)


if __name__ == "__main__":
    _import_this_checkout()
    main()
