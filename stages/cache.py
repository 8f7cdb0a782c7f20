"""`egoslots cache ...`: list, describe, verify (and repair) and remove feature stores.

STORE is a store path or URL, or a fingerprint (or a unique prefix of one) under
``<work-dir>/stores`` (or ``--store-dir``, which may be an fsspec URL such as s3://bucket/x).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from egoslots.cache import catalog
from egoslots.cache.location import Location, name_of, size_bytes
from egoslots.cache.store import FeatureStore, StoreError
from egoslots.cache.verify import forget_chunks, verify_store

DEFAULT_WORK_DIR = "./egoslots-work"


def find_store(name: str, work_dir: str, store_dir: str | None = None) -> Location:
    """A STORE argument (path, URL or fingerprint prefix) as a location."""
    try:
        return catalog.find_store(name, work_dir, store_dir)
    except StoreError as err:
        raise click.ClickException(str(err)) from err


def _open(path: Location, mode: str = "r") -> FeatureStore:
    try:
        return FeatureStore.open(path, require_complete=False, mode=mode)
    except StoreError as err:
        raise click.ClickException(str(err)) from err


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


work_dir_option = click.option(
    "--work-dir",
    default=DEFAULT_WORK_DIR,
    show_default=True,
    help="Work directory whose stores/ a fingerprint refers to.",
)
store_dir_option = click.option(
    "--store-dir",
    default=None,
    help="Stores folder or URL (s3://bucket/prefix) instead of WORK_DIR/stores.",
)


@click.group(name="cache", epilog="\b\nExample:\n  egoslots cache ls ./egoslots-work")
def cache():
    """List, describe, verify or remove feature stores."""


@cache.command(name="ls", epilog="\b\nExample:\n  egoslots cache ls ./egoslots-work")
@click.argument("work_dir", required=False, default=DEFAULT_WORK_DIR)
@store_dir_option
def ls(work_dir: str, store_dir: str | None):
    """Stores under WORK_DIR/stores (or --store-dir): fingerprint, state, size, backbone, frames, dtype."""
    folder = catalog.stores_dir(work_dir, store_dir)
    if not store_dir and Path(work_dir).exists() and not Path(work_dir).is_dir():
        raise click.ClickException(f"WORK_DIR {work_dir} is a file, not a work directory")
    try:
        paths = catalog.list_stores(folder)
    except StoreError as err:  # an unreachable remote folder
        raise click.ClickException(str(err)) from err
    if not paths:
        click.echo(f"no stores in {folder}")
        return
    header = f"{'fingerprint':<18} {'state':<14} {'size':>10} {'backbone':<28} {'videos':>7} {'frames':>9} {'dtype':<8} created"
    click.echo(header)
    for path in paths:
        try:
            st = FeatureStore.open(path, require_complete=False)
        except StoreError as err:
            click.echo(
                f"{name_of(path):<18} {'unreadable':<14} {human_bytes(size_bytes(path)):>10} ({err})"
            )
            continue
        done, total = st.progress()
        state = "complete" if st.complete else f"{done}/{total} chunks"
        backbone = str(st.meta.get("backbone", {}).get("name", "?"))
        click.echo(
            f"{st.fingerprint:<18} {state:<14} {human_bytes(size_bytes(path)):>10} {backbone:<28} "
            f"{len(st.videos):>7} {st.num_frames:>9} {st.meta.get('feature_dtype', '?'):<8} "
            f"{st.meta.get('created', '?')}"
        )


@cache.command(
    name="info",
    epilog="\b\nExample:\n  egoslots cache info 1432a78eda16b802 --work-dir ./egoslots-work",
)
@click.argument("store")
@work_dir_option
@store_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print every attribute as JSON.")
def info(store: str, work_dir: str, store_dir: str | None, as_json: bool):
    """Summary of one store's attributes (STORE: path, URL or fingerprint)."""
    st = _open(find_store(store, work_dir, store_dir))
    meta = st.meta
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    done, total = st.progress()
    splits: dict[str, int] = {}
    for v in st.videos:
        splits[v.split] = splits.get(v.split, 0) + 1
    bb = meta.get("backbone", {})
    lines = [
        ("path", str(st.path)),
        ("fingerprint", st.fingerprint),
        ("state", "complete" if st.complete else f"incomplete: {done}/{total} chunks done"),
        ("created / finished", f"{meta.get('created')} / {meta.get('finished', '-')}"),
        (
            "backbone",
            f"{bb.get('name')} (input {bb.get('input_size')} px, patch {bb.get('patch_size')}, "
            f"checkpoint sha256 {str(bb.get('checkpoint_sha256'))[:12]})",
        ),
        (
            "features",
            f"{st.num_frames} x {meta['num_tokens']} x {st.feature_dim} {meta['feature_dtype']} "
            f"(grid {st.grid[0]}x{st.grid[1]}, computed in {meta.get('compute_dtype')})",
        ),
        (
            "frames / masks",
            f"{st.frame_size}x{st.frame_size} RGB uint8 / {'yes' if st.has_masks else 'none'}",
        ),
        (
            "videos",
            f"{len(st.videos)} rows ({', '.join(f'{k} {n}' for k, n in sorted(splits.items()))}), "
            f"hflip {meta.get('hflip', 'none')}",
        ),
        ("skipped videos", str(len(meta.get("skipped_videos") or []))),
        (
            "layout",
            f"chunk {st.chunk_len} frames (one shard file per array), inner chunk "
            f"{meta.get('inner_chunk_len')} frames, compressor {meta.get('compressor')}, "
            f"crc32c {'on' if meta.get('checksum') else 'off'}",
        ),
        ("tokens", ", ".join(st.token_group_names()) or "none"),
        ("size on disk", human_bytes(size_bytes(st.path))),
        ("versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key:<{width}}  {value}")


@cache.command(
    name="verify",
    epilog="\b\nExample:\n  egoslots cache verify ./egoslots-work/stores/1432a78eda16b802.zarr",
)
@click.argument("store")
@work_dir_option
@store_dir_option
@click.option(
    "--repair",
    is_flag=True,
    help="Mark the chunks with bad data as not written, so rerunning extract-features / tokenize "
    "rewrites exactly those chunks.",
)
def verify(store: str, work_dir: str, store_dir: str | None, repair: bool):
    """Check every chunk is flagged done, present, uncorrupted and finite; exit 1 naming each fault.

    With --repair, chunks with bad data are flagged not written (the store becomes incomplete)
    and the message says which command rewrites them.
    """
    from tqdm import tqdm

    st = _open(find_store(store, work_dir, store_dir), mode="r+" if repair else "r")
    if repair and not st.complete:  # a writer may still be at work: repairing beside it could race
        raise click.ClickException(
            f"{st.path} is incomplete: --repair works on finished stores. Finish it first "
            "(rerun `egoslots extract-features CONFIG`; stop any other writer), then verify again"
        )
    _, total = st.progress()
    with tqdm(total=total, unit="chunk", desc=f"verify {st.fingerprint}", leave=False) as bar:
        problems = verify_store(st, progress=lambda _chunk: bar.update(1))
    if problems:
        for line in problems:
            click.echo(f"FAULT {line}", err=True)
        bad = sorted({p.chunk for p in problems if p.chunk is not None})
        if repair and bad:
            unflagged = forget_chunks(st, problems)
            rerun = []
            if "done" in unflagged:
                rerun.append(
                    f"`egoslots extract-features CONFIG` (the config that made it) to rewrite chunk(s) "
                    f"{', '.join(map(str, unflagged['done']))}"
                )
            for flags, chunks in unflagged.items():
                if flags != "done":
                    rerun.append(
                        f"`egoslots tokenize RUN` (the dVAE run of {flags.split('/')[1]}) to rewrite "
                        f"token chunk(s) {', '.join(map(str, chunks))}"
                    )
            raise click.ClickException(
                f"{st.path}: {len(problems)} problem(s); marked the bad chunk(s) as not "
                "written. Now run " + " and ".join(rerun)
            )
        if bad:
            hint = (
                f"run `egoslots cache verify {st.path} --repair`, then rerun the command that wrote them, to "
                f"rewrite chunk(s) {', '.join(map(str, bad))}"
            )
        elif not st.complete or any("not flagged done" in p.text for p in problems):
            hint = (
                "rerun `egoslots extract-features CONFIG` (or `egoslots tokenize RUN`) to finish it"
            )
        else:
            hint = "the video table is damaged: re-extract (`egoslots extract-features CONFIG --overwrite`)"
        raise click.ClickException(f"{st.path}: {len(problems)} problem(s) found; {hint}")
    click.echo(
        f"{st.path}: OK ({total} chunks, {st.num_frames} frames, arrays {', '.join(st.data_arrays())})"
    )


@cache.command(name="rm", epilog="\b\nExample:\n  egoslots cache rm 1432a78eda16b802 --yes")
@click.argument("store")
@work_dir_option
@store_dir_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def rm(store: str, work_dir: str, store_dir: str | None, yes: bool):
    """Delete a store (asks first unless --yes)."""
    path = find_store(store, work_dir, store_dir)
    if not FeatureStore.written_by_egoslots(path):  # (stores of an older format may go too)
        raise click.ClickException(
            f"refusing to delete {path}: it is not an egoslots feature store (no zarr group with "
            "'egoslots' attrs); egoslots only deletes stores it wrote"
        )
    size = human_bytes(size_bytes(path))
    what = f"delete {path} ({size})"
    if isinstance(path, Path) and path.is_symlink():  # the link goes, the store it points to stays
        what = f"remove the link {path} (the {size} store it points to is kept)"
    if not yes and not click.confirm(f"{what}?", default=False):
        click.echo("kept")
        return
    click.echo(f"{catalog.remove_store(path)} ({size})")
