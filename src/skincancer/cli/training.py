"""Commands on training: train, distil a teacher into a student, fit a run's guard, write its model card."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..config import load_config, parse_labels, parse_source_weights
from ..progress import in_torchrun, other_rank
from .common import fail, output_file


def train(
    train: Annotated[list[str] | None, typer.Option(help=(
        "training manifest CSV or folder-per-class directory; repeat for several sources"))] = None,
    valid: Annotated[str | None, typer.Option(help="validation manifest CSV or folder")] = None,
    out: Annotated[str | None, typer.Option(help="run folder to create")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config; flags override it")] = None,
    mode: Annotated[str | None, typer.Option(help="linear | finetune")] = None,
    backbone: Annotated[str | None, typer.Option(help="timm model name")] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    eval_image_size: Annotated[int | None, typer.Option(
        help="fine-tune: size for validation and prediction (default: --image-size)")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    head: Annotated[str | None, typer.Option(help="diagnosis (one output per class) | binary")] = None,
    labels: Annotated[str | None, typer.Option(help="diagnosis=0|1 pairs")] = None,
    threshold_policy: Annotated[str | None, typer.Option(help="sensitivity:0.90 | youden | fixed:0.5 | ...")] = None,
    select_on: Annotated[str | None, typer.Option(help=(
        "a source (the manifests' `source` column) whose held-out images alone choose the model and its threshold"))
                         ] = None,
    source_weight: Annotated[list[str] | None, typer.Option(help=(
        "SOURCE=WEIGHT: how often an epoch draws each image of that source (1 = once, 0.2 = one epoch in five; "
        "others 1); once per source"))] = None,
    augment: Annotated[str | None, typer.Option(help="none | standard | strong | perez")] = None,
    resize: Annotated[str | None, typer.Option(help="squash (the whole image) | crop (its centre square)")] = None,
    num_workers: Annotated[int | None, typer.Option()] = None,
    max_steps_per_epoch: Annotated[int | None, typer.Option(help="cap steps per epoch (smoke tests)")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained")] = None,
    init_from: Annotated[str | None, typer.Option(help=(
        "start from this run's weights instead of ImageNet's (same backbone; e.g. a run pre-trained on another "
        "source); its data's licences travel on"))] = None,
    resume: Annotated[Path | None, typer.Option(help="continue an interrupted run from its last epoch")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace the run already in --out (its model and checkpoints)")
                         ] = False,
    nproc: Annotated[int | None, typer.Option(help="train with N processes (torchrun, DDP)")] = None,
    metadata: Annotated[bool | None, typer.Option(
        "--metadata/--no-metadata", help="also fit an age/sex model from the manifest (fused where given)")] = None,
) -> None:
    """Train a model and write a self-describing run folder (config, summary, TensorBoard, model/)."""
    given = [name for name, value in locals().items()
             if name not in ("resume", "nproc", "overwrite") and value is not None]
    if nproc is not None and nproc < 1:
        fail(f"--nproc: expected 1 or more processes, got {nproc}")
    from ..resume import check_resume_processes, resume_config
    from ..runfolder import check_start, is_finished
    from ..train import train as run_training

    if resume is not None and is_finished(resume):  # before torchrun starts N processes to say so
        typer.echo(f"{resume}: the run has finished already (model/ is saved); nothing to resume")
        return
    if resume is not None:
        if overwrite:
            fail("--resume continues the run in its folder; --overwrite would replace it: choose one")
        if given:
            fail(f"--resume continues a run with its own config.yaml; drop --{', --'.join(given).replace('_', '-')}")
        cfg = resume_config(resume, quiet=nproc is not None and nproc > 1)  # torchrun's rank 0 says it
    else:
        cfg = load_config(config, train=train or None, valid=valid, out=out, mode=mode, backbone=backbone,
                          image_size=image_size, eval_image_size=eval_image_size, epochs=epochs, batch_size=batch_size,
                          lr=lr, seed=seed, head=head, labels=parse_labels(labels) if labels else None,
                          threshold_policy=threshold_policy, select_on=select_on, augment=augment, resize=resize,
                          num_workers=num_workers, max_steps_per_epoch=max_steps_per_epoch, pretrained=pretrained,
                          metadata=metadata, init_from=init_from,
                          source_weights=parse_source_weights(source_weight) if source_weight else None)
    if not in_torchrun():  # what train() would refuse at once, said before torchrun starts N processes to say it
        check_start(cfg, overwrite=overwrite, resume=resume is not None)
        if resume is not None:
            check_resume_processes(resume, nproc or 1)
    if nproc is not None and nproc > 1:
        from ..launch import LaunchError, torchrun

        try:
            torchrun(nproc, cfg, resume=resume is not None, overwrite=overwrite)
        except LaunchError as err:
            fail(str(err))
        raise typer.Exit(0)
    run = run_training(cfg, resume=resume is not None, overwrite=overwrite)
    if not other_rank():  # under torchrun, rank 0 saves the run; the others only help
        typer.echo(f"run saved to {run}")



def distill(
    teacher: Annotated[list[str], typer.Option(help=(
        "the teacher's run folder; repeat for an ensemble (its members' probabilities averaged, each with its own "
        "test-time views)"))],
    train: Annotated[list[str], typer.Option(help=(
        "labelled training manifest CSV or folder-per-class directory; repeat for several sources"))],
    valid: Annotated[str, typer.Option(help="validation manifest CSV or folder: the epoch and threshold")],
    out: Annotated[str, typer.Option(help="the student's run folder to create")],
    extra: Annotated[list[str] | None, typer.Option(help=(
        "extra images the teacher labels (a transfer set; no labels needed): manifest CSV, folder or file; "
        "repeat"))] = None,
    alpha: Annotated[float | None, typer.Option(help=(
        "share of a labelled image's target taken from the teacher (the rest: its true label); default 0.7"))] = None,
    out_of_fold: Annotated[bool | None, typer.Option("--out-of-fold/--no-out-of-fold", help=(
        "each image's target from only the teacher runs never fitted on it: give --teacher the runs of every fold "
        "of a cross-validation"))] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config for the student (fine-tuning); flags override it")
                      ] = None,
    backbone: Annotated[str | None, typer.Option(help="the student's timm model (default tf_efficientnet_lite0)")
                        ] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    num_workers: Annotated[int | None, typer.Option()] = None,
    max_steps_per_epoch: Annotated[int | None, typer.Option(help="cap steps per epoch (smoke tests)")] = None,
    init_from: Annotated[str | None, typer.Option(help=(
        "start from this run's weights instead of ImageNet's (same backbone: e.g. one of the teachers); its data's "
        "licences travel on"))] = None,
    source_weight: Annotated[list[str] | None, typer.Option(help=(
        "SOURCE=WEIGHT: how often an epoch draws each image of that source (training or extra images; others 1)"))
                             ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace the run already in --out")] = False,
) -> None:
    """Train one student network (fine-tuned, one view) on a teacher's probabilities: an ordinary run folder whose
    model.json and card name the teacher. An interrupted one goes on with `skincancer train --resume OUT`."""
    from ..runfolder import check_start
    from ..train import train as run_training

    cfg = load_config(config, mode="finetune", teacher=teacher, extra=extra or None, distill_alpha=alpha,
                      distill_out_of_fold=out_of_fold, train=train, valid=valid, out=out, backbone=backbone,
                      image_size=image_size, epochs=epochs, batch_size=batch_size, num_workers=num_workers,
                      max_steps_per_epoch=max_steps_per_epoch, init_from=init_from,
                      source_weights=parse_source_weights(source_weight) if source_weight else None)
    check_start(cfg, overwrite=overwrite, resume=False)
    typer.echo(f"run saved to {run_training(cfg, overwrite=overwrite)}")


def card(
    model: Annotated[list[Path], typer.Option(help="run folder; repeat for an ensemble (probabilities averaged)")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="write the Markdown here instead of stdout")] = None,
) -> None:
    """The model card (Markdown): what the model is, how it was trained and validated, its intended use and limits.
    Training writes one for each run too (RUN/model/MODEL_CARD.md)."""
    from ..card import CARD_HEADING, markdown_card
    from ..checkpoint import META_FILE, atomic_write, find_model_dir
    from ..ensemble import load_models

    if out is not None:
        output_file(out, (".md",))
        own = len(model) == 1 and out.parent.resolve() == find_model_dir(model[0]).resolve()
        if (out.parent / META_FILE).is_file() and not own:
            fail(f"--out {out}: that is another run's model folder ({out.parent}); its card describes that run")
        if out.is_file() and out.stat().st_size and not out.read_text(errors="replace").startswith(CARD_HEADING):
            fail(f"--out {out}: already exists and is not a model card; remove it or choose another name")
    text = markdown_card(load_models(model, engine="torch"))
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: tmp.write_text(text))
    typer.echo(f"wrote {out}", err=True)


def guard(
    model: Annotated[Path, typer.Option(help="run folder")],
    train: Annotated[Path | None, typer.Option(help="training manifest (default: the run's config.yaml)")] = None,
    valid: Annotated[Path | None, typer.Option(help="validation manifest (default: the run's config.yaml)")] = None,
    false_rejection: Annotated[float, typer.Option(help=(
        "share of held-in dermoscopy images the threshold may refuse"))] = 0.02,
    batch_size: int = 32,
) -> None:
    """Fit the out-of-distribution guard of a trained run (training fits one; this adds it to a run made before
    the guard, or refits it at another false-rejection rate). Images past it get no verdict."""
    from ..guard_refit import guard_run

    if not 0 < false_rejection < 0.5:
        fail(f"--false-rejection: expected a share between 0 and 0.5 (e.g. 0.02), got {false_rejection}")
    record = guard_run(model, train, valid, false_rejection, batch_size=batch_size)
    typer.echo(f"guard fitted on {record['n_fit']} images: threshold {record['threshold']:.4f} refuses "
               f"{record['held_in_rejected']:.1%} of {record['n_held_in']} held-in images ({record['held_in']}); "
               f"written to {model}/model/", err=True)
