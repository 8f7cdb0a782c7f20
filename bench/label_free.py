"""Which label-free number predicts video FG-ARI / mBO? (docs/label-free.md's table)

Evaluates a COPY of a trained run (the source run is only read) on its test split, one torch
thread, then correlates every label-free number of every (method, video) with that video's raw
video FG-ARI and mBO: Pearson's r and Spearman's rho across methods and videos, across videos
within each method (each method's mean taken off), and for the primary model alone. Methods whose
masks are another's (attention mixing) count once.

    python bench/label_free.py [RUN] [--work egoslots-work/label-free-bench] [--max-videos N]
    python bench/label_free.py --tables-only [--work ...]   # the tables again, no evaluation

RUN defaults to the demo run (``egoslots run configs/demo.yaml``'s ``runs/demo``). Prints the
evaluation and correlation tables and writes them, with the per-video values, to
``WORK/label_free.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import time

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from egoslots.pipeline import label_free as lf  # noqa: E402
from egoslots.stages import evaluate as ev  # noqa: E402

TARGETS = {"video_fg_ari": "FG-ARI", "video_mbo": "mBO"}
DEFAULT_RUN = "egoslots-work/demo/runs/demo"  # what `egoslots run configs/demo.yaml` trains


def copy_run(src: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    """The run's files copied under ``work/runs``. A relative store path in inputs.json (relative
    to the run, or in older runs to the directory it was trained from) is made absolute: the
    run's own folder or the first folder above it that holds it."""
    src = src.resolve()
    dest = work / "runs" / src.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("metrics.*", ".egoslots-lock", "viz"))
    inputs = json.loads((dest / "inputs.json").read_text())
    store = pathlib.Path(inputs["store"])
    if not store.is_absolute():
        found = [(p / store).resolve() for p in (src, *src.parents) if (p / store).is_dir()]
        if not found:
            sys.exit(f"{src / 'inputs.json'}: store {store} is not under any folder above the run")
        inputs["store"] = str(found[0])
        (dest / "inputs.json").write_text(json.dumps(inputs, indent=2))
    return dest


def pairs(result: dict, methods: list[str], demean: bool = False) -> dict:
    """{number: {target: (x list, y list)}} over (method, video) of the given methods;
    ``demean``: each method's own mean taken off both sides (what varies across videos only)."""
    out: dict = {}
    for method in methods:
        masked = result["per_video"][method]
        free = result["label_free"]["per_video"][method]
        for number in lf.NUMBERS:
            for target in TARGETS:
                xs, ys = [], []
                for x, y in zip(free.get(number, []), masked.get(target, [])):
                    if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                        xs.append(x)
                        ys.append(y)
                if demean and xs:
                    xs = list(np.asarray(xs) - np.mean(xs))
                    ys = list(np.asarray(ys) - np.mean(ys))
                all_x, all_y = out.setdefault(number, {}).setdefault(target, ([], []))
                all_x += xs
                all_y += ys
    return out


def correlate(xs: list, ys: list) -> tuple[float, float, int]:
    """(Pearson r, Spearman rho, n); NaN where a side is constant or n < 3."""
    if len(xs) < 3 or np.ptp(xs) < 1e-12 or np.ptp(ys) < 1e-12:
        return float("nan"), float("nan"), len(xs)
    return float(stats.pearsonr(xs, ys)[0]), float(stats.spearmanr(xs, ys)[0]), len(xs)


def distinct_methods(result: dict) -> list[str]:
    """The methods of both tables, less those whose masks were another's (attention mixing makes
    the decoder's masks the attention masks): counted once, not twice."""
    kept: list[str] = []
    for method in ev.LABEL_FREE_METHODS:
        if method not in result["per_video"]:
            continue
        same = [
            m
            for m in kept
            if _same(result["per_video"][m], result["per_video"][method])
            and _same_numbers(result["label_free"]["per_video"], m, method)
        ]
        if not same:
            kept.append(method)
    return kept


def _same(a, b) -> bool:
    """Equal values, nested lists and dicts, NaN equal to NaN (a freshly computed result holds
    NaN where a method has no value: NaN != NaN, so plain == kept duplicate rows)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _same_numbers(per_video: dict, a: str, b: str) -> bool:
    """The label-free numbers of a and b agree (the reconstruction error is the decoder row's)."""
    keys = [k for k in lf.NUMBERS if not k.startswith("feature_rec")]
    return all(_same(per_video[a].get(k), per_video[b].get(k)) for k in keys)


def table(result: dict) -> tuple[str, dict]:
    """The correlation tables (Markdown) and their figures {scope: {number: {target: [r, rho, n]}}}."""
    shared = distinct_methods(result)
    scopes = {
        "across methods and videos: every (method, video) pair of " + ", ".join(shared): (
            shared,
            False,
        ),
        "across videos within each method: each method's mean taken off both sides, then pooled": (
            shared,
            True,
        ),
        f"across videos, {ev.PRIMARY} alone": ([ev.PRIMARY], False),
    }
    lines, raw = [], {}
    for scope, (methods, demean) in scopes.items():
        found = pairs(result, methods, demean)
        lines += [
            "",
            f"Correlation with per-video scores, {scope}. Pearson r / Spearman rho (n pairs).",
            "",
            "| label-free number | " + " | ".join(TARGETS.values()) + " |",
            "|---|" + "---|" * len(TARGETS),
        ]
        for number in lf.NUMBERS:
            cells = []
            for target in TARGETS:
                r, rho, n = correlate(*found[number][target])
                raw.setdefault(scope, {}).setdefault(number, {})[target] = [r, rho, n]
                cells.append("n/a" if n < 3 or math.isnan(r) else f"{r:+.2f} / {rho:+.2f} ({n})")
            label = ev.LABEL_FREE_LABELS.get(number, "feature rec. error (MSE)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=DEFAULT_RUN, type=pathlib.Path)
    parser.add_argument("--work", default="egoslots-work/label-free-bench", type=pathlib.Path)
    parser.add_argument("--max-videos", type=int, default=None)
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="Recompute the correlation tables from WORK/label_free.json (no evaluation).",
    )
    args = parser.parse_args()
    saved = args.work / "label_free.json"
    if args.tables_only:
        if not saved.is_file():
            sys.exit(f"no {saved}: run without --tables-only first")
        print(table(json.loads(saved.read_text()))[0])
        return
    if not (args.run / "inputs.json").is_file():
        sys.exit(f"{args.run} is not a train-slots run directory (no inputs.json)")
    torch.set_num_threads(1)
    ev.configure_threads = lambda _n: torch.set_num_threads(1)  # the run's setting: one thread here
    run = copy_run(args.run, args.work)
    started = time.perf_counter()
    result = ev.evaluate_run(run, split="test", max_videos=args.max_videos, probe=False)
    seconds = time.perf_counter() - started
    text, raw = table(result)
    print(ev.format_table(result))
    print(text)
    print(f"\n{result['num_videos']} test videos of {args.run}, {seconds:.0f} s on one thread")
    saved.write_text(
        json.dumps(
            ev._finite(
                {
                    "run": str(args.run),
                    "correlations": raw,
                    "methods": result["methods"],
                    "label_free": result["label_free"],
                    "video_ids": result["video_ids"],
                    "per_video": {
                        m: {t: result["per_video"][m][t] for t in TARGETS}
                        for m in result["per_video"]
                    },
                    "num_videos": result["num_videos"],
                    "seconds": seconds,
                }
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
