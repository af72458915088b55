"""Commands on data: index images into a manifest, preview a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import parse_labels
from .common import DEFAULT_LABELS_TEXT, fail, output_file


def index(
    directory: Annotated[Path | None, typer.Argument(help="folder-per-class tree: DIR/<diagnosis>/*.jpg")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="manifest CSV to write")] = Path("manifest.csv"),
    labels: Annotated[str, typer.Option(help="diagnosis=0|1 pairs; 1 = malignant")] = DEFAULT_LABELS_TEXT,
    isic_csv: Annotated[Path | None, typer.Option(help=(
        "ground-truth CSV instead of DIR: ISIC 2017, ISIC 2018/2019 (one-hot) or the HAM10000 metadata; "
        "the layout is read from its header"))] = None,
    images: Annotated[Path | None, typer.Option(help="image folder for --isic-csv")] = None,
    source: Annotated[str | None, typer.Option(help=(
        "the source's name in the manifest's `source` column (default: the CSV's layout, e.g. ham10000, or DIR's "
        "name)"))] = None,
    licence: Annotated[str | None, typer.Option(help=(
        "the images' licence, carried into every model trained on them (default: known for isic2017, isic2018, "
        "isic2019 and ham10000; otherwise 'not stated')"))] = None,
    skip_bad: Annotated[bool, typer.Option(help="drop unreadable files instead of failing")] = False,
    metadata: Annotated[Path | None, typer.Option(
        help="ISIC metadata CSV (image_id, age_approximate, sex) to join into the manifest")] = None,
) -> None:
    """Index images into a manifest (filepath, label, diagnosis); every file is decoded and checked."""
    from ..data import check_files, index_folder, refuse_conflicting_copies, save_manifest
    from ..metadata import attach, read_metadata_csv, records
    from ..sources import index_csv, with_source

    # "image_id,filepath": a manifest; an ISIC ground-truth or metadata CSV starts with image_id alone
    output_file(out, (".csv",), inputs=[isic_csv, metadata], replaces=("image_id", "filepath"))
    label_map = parse_labels(labels)
    patient = read_metadata_csv(metadata) if metadata is not None else None
    if isic_csv is not None:
        if images is None:
            fail("--isic-csv needs --images DIR")
        manifest = index_csv(isic_csv, images, label_map, source, licence)
    elif directory is not None:
        manifest = with_source(index_folder(directory, label_map), source or directory.absolute().name, licence)
    else:
        fail("give a DIRECTORY or --isic-csv GT.csv --images DIR")
    bad = check_files(list(manifest["filepath"]))
    for item in bad:
        typer.echo(f"bad file: {item.path}: {item.reason}", err=True)
    if bad and not skip_bad:
        fail(f"{len(bad)} of {len(manifest)} files are unusable (listed above); fix them or pass --skip-bad")
    manifest = manifest[~manifest["filepath"].isin({b.path for b in bad})]
    if manifest.empty:
        fail("no usable images left")
    for group in refuse_conflicting_copies(manifest, str(directory or isic_csv)):
        typer.echo(f"warning: identical files (one image counted {len(group)} times): "
                   f"{', '.join(manifest['filepath'].iloc[i] for i in group)}", err=True)
    if patient is not None:
        manifest = attach(manifest, patient)
        known = sum(row is not None for row in records(manifest, str(metadata)))
        typer.echo(f"metadata: age or sex known for {known} of {len(manifest)} images")
        if not known:
            typer.echo(f"warning: {metadata} gives age or sex for none of these images (matched on image_id); is it "
                       "this data set's metadata?", err=True)
    save_manifest(manifest, out)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["diagnosis"].value_counts().sort_index().items())
    typer.echo(f"wrote {out}: {len(manifest)} images ({counts}); {len(bad)} skipped")


def preview(
    manifest: Annotated[Path, typer.Argument(help="manifest CSV or folder-per-class directory")],
    out: Annotated[Path, typer.Option("-o", "--out")] = Path("grid.png"),
    n: Annotated[int, typer.Option(help="number of images")] = 16,
    seed: int = 0,
    labels: Annotated[str, typer.Option(help="diagnosis=0|1 pairs for a folder-per-class tree; 1 = malignant")
                      ] = DEFAULT_LABELS_TEXT,
) -> None:
    """Save a grid of sample images with their labels."""
    from ..data import resolve_data
    from ..report import preview_grid

    if n < 1:
        fail(f"--n: expected 1 or more images, got {n}")
    data = resolve_data(manifest, parse_labels(labels))
    output_file(out, (".png",), inputs=list(data["filepath"]))
    preview_grid(data, out, n=n, seed=seed)
    typer.echo(f"wrote {out}")
