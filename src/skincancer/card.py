"""Model cards: what a model is, what it was trained and validated on, and what it is not for; as the dict that
GET /api/model answers and as a Markdown page (`skincancer card`, and MODEL_CARD.md beside each trained model)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from . import NOTICE, __version__
from .checkpoint import atomic_write
from .predict import Classifier
from .provenance import describe
from .sources import licence_note

CARD_FILE = "MODEL_CARD.md"
CARD_HEADING = "# Model card: "
FIGURE_NAMES = {"auc": "AUC", "brier": "Brier score", "ece": "calibration error (ECE)"}


def model_card(classifier: Classifier) -> dict:
    """What GET /api/model says: the model's name, version, classes, threshold and validation figures; for an
    ensemble, also each member's name, backbone, input size, engine and test-time views."""
    meta = classifier.meta
    members = classifier.members
    return {
        "name": " + ".join(_run_name(m) for m in members) if members else _run_name(classifier),
        "backbone": meta["backbone"],
        "version": meta.get("skincancer_version", __version__),
        "engine": classifier.engine_name,
        "class_names": classifier.class_names,
        "labels": meta["labels"],
        "positive_name": classifier.positive_name,
        "negative_name": classifier.negative_name,
        "threshold": classifier.threshold,
        "threshold_policy": meta.get("threshold_policy"),
        "image_size": meta["image_size"],
        "mode": meta.get("mode"),
        "members": [{"name": _run_name(m), "backbone": m.meta["backbone"], "image_size": m.meta["image_size"],
                     "engine": m.engine_name, "tta": m.meta.get("tta", 1), "trained": _trained(m.meta)}
                    for m in members],
        "trained": None if members else _trained(meta),  # an ensemble's: per member
        "validation": meta.get("validation", {}),
        "validation_source": meta.get("validation_source", "valid"),  # or out-of-fold over train+valid
        "metadata": classifier.uses_metadata,  # age/sex fused with the image where given
        "guard": _guard(classifier),  # null: no out-of-distribution guard (frame checks only)
        "unfinished": bool(meta.get("unfinished")),  # an ensemble's: any member's
        "notice": NOTICE,
        # the data each model learnt from and its terms; None: saved before runs recorded their sources
        "sources": _sources(members or [classifier]),
        "licence": licence_note(_sources(members or [classifier]) or []),  # a restriction, in a sentence, or None
    }


def _sources(members) -> list[dict] | None:
    """The training sources of a model (an ensemble: of all its members), each with its licence and image counts."""
    if not all(isinstance(m.meta.get("sources"), list) for m in members):
        return None
    rows: dict[str, dict] = {}
    for member in members:
        for source in member.meta["sources"]:
            row = rows.setdefault(source["name"], {**source, "train_images": 0, "valid_images": 0})
            row["train_images"] += source.get("train_images", 0)
            row["valid_images"] += source.get("valid_images", 0)
            weight = member.meta.get("source_weights", {}).get(source["name"])
            if weight is not None and weight not in row.setdefault("drawn", []):
                row["drawn"].append(weight)  # each epoch drew its images this often (source_weights), not once
    return list(rows.values())


def _guard(classifier: Classifier) -> dict | None:
    """The out-of-distribution guard in brief (an ensemble: one decision over its members' scores)."""
    if not classifier.has_guard:
        return None
    members = classifier.runs
    records = [m.meta["guard"] for m in members]
    return {"method": records[0].get("method"), "limit": 1.0,
            "false_rejection": [r.get("false_rejection") for r in records] if len(records) > 1
            else records[0].get("false_rejection"),
            "combined": "mean of the members' scores" if len(records) > 1 else None}


def _guard_use(members) -> str:
    records = [m.meta.get("guard") for m in members]
    if not all(records):
        return ("none: any photo gets a verdict, except blank, black or washed-out frames (fit one: `skincancer "
                "guard --model RUN`).")
    parts = [f"Mahalanobis distance on {_md(str(r.get('features', 'pooled features')))}, fitted on "
             f"{r.get('n_fit', '?')} images; threshold chosen on {r.get('n_held_in', '?')} held-in images "
             f"({_md(str(r.get('held_in', '?')))}) to refuse {r.get('false_rejection', 0.02):.0%} of them"
             for r in records]
    combined = " The ensemble refuses on the mean of its members' scores." if len(records) > 1 else ""
    return ("photos unlike the training images, and blank, black or washed-out frames, get no verdict. "
            + "; ".join(parts) + "." + combined)


def _trained(meta: dict) -> dict | None:
    """When and from which code a model was trained (model.json's `environment`, without paths); None before runs
    recorded it."""
    env = meta.get("environment")
    if not isinstance(env, dict):
        return None
    return {"at": env.get("at"), "skincancer": env.get("skincancer"), "git": env.get("git")}


def _run_name(classifier: Classifier) -> str:
    source = classifier.source
    return source.parent.name if source.name == "model" else source.name


def markdown_card(classifier: Classifier) -> str:
    """The model card as Markdown (templates/card.md): the model, its training record, its validation figures,
    intended use and limitations. Built from model.json (for an ensemble, each member's), so it says only what the runs
    recorded."""
    return _templates().get_template("card.md").render(card_context(classifier))


def card_context(classifier: Classifier) -> dict:
    """What templates/card.md shows, as plain values: the template passes the names a user chose through |md."""
    card = model_card(classifier)
    members = classifier.runs
    labels, classes = card["labels"], card["class_names"]
    trained = _trained_diagnoses(members) or list(labels)  # the training record's, where there is one
    validation = card["validation"] or {}
    figures = {k: v for k, v in validation.items() if "metadata" not in k}
    return {
        "name": card["name"], "notice": NOTICE, "backbone": card["backbone"], "mode": _mode(classifier.meta),
        "input": _input(classifier.meta), "views": classifier.meta.get("tta", 1),
        "members": [{"name": _run_name(m), "backbone": m.meta["backbone"], "mode": _mode(m.meta),
                     "input": _input(m.meta), "tta": card["members"][i]["tta"]}
                    for i, m in enumerate(members)] if card["members"] else [],
        "diagnoses": trained, "malignant": [d for d in trained if labels.get(d) == 1],
        "benign": [d for d in trained if labels.get(d) == 0], "classes": classes,
        "summed": [c for c in classes if labels.get(c) == 1],  # a diagnosis head sums its malignant classes
        "positive": card["positive_name"], "negative": card["negative_name"],
        "threshold": f"{card['threshold']:.4g}", "policy": card["threshold_policy"],
        "fixed": str(card["threshold_policy"]).startswith("fixed"), "source": _source(card),
        "metadata_use": _metadata_use(members), "guard_use": _guard_use(members), "version": card["version"],
        "sources": card["sources"], "licence": card["licence"], "unfinished": card["unfinished"],
        "training": [_training(member, len(members) > 1) for member in members],
        "taught": [_taught(member, len(members) > 1) for member in members if member.meta.get("distilled_from")],
        "started": [{"name": f"{_run_name(m)}: " if len(members) > 1 else "", **m.meta["initialised_from"]}
                    for m in members if m.meta.get("initialised_from")],
        "figures": figures, "few": isinstance(figures.get("n"), int) and figures["n"] < 500,
        "with_metadata": {k: v for k, v in validation.items() if "metadata" in k},
        "share": _malignant_share(members, labels), "balanced": _balanced(members), "figure_names": FIGURE_NAMES,
    }


def _taught(member: Classifier, named: bool) -> dict:
    """A distilled model's teacher, for the card: who, how much of the target, on how many images."""
    record = member.meta["distilled_from"]
    teachers = [f"{name} ({t['backbone']}, {t['tta']} view{'s' if t['tta'] > 1 else ''})"
                for name, t in zip(teacher_names(record), record["teachers"], strict=True)]
    return {"name": f"{_run_name(member)}: " if named else "", "teachers": teachers, "alpha": record["alpha"],
            "out_of_fold": bool(record.get("out_of_fold")),
            "rest": round(1 - record["alpha"], 4), "labelled": record["labelled_images"],
            "extra": record["extra_images"], "smoothing": record.get("label_smoothing", 0.0)}


def teacher_names(record: dict) -> list[str]:
    """Each teacher run's name for people: its folder's name, or, where two share one (the fold runs of a
    cross-validation: lite0/fold0/run), its path below their common folder (else as recorded)."""
    runs = [Path(t["run"]) for t in record["teachers"]]
    names = [run.name for run in runs]
    if len(set(names)) == len(names):
        return names
    try:
        common = Path(os.path.commonpath([run.absolute() for run in runs]))
        relative = [run.absolute().relative_to(common).as_posix() for run in runs]
    except ValueError:  # no common folder (another drive)
        return [str(run) for run in runs]
    return [name if name != "." else str(run) for name, run in zip(relative, runs, strict=True)]


@functools.cache
def _templates():
    from jinja2 import Environment, PackageLoader

    # Markdown, not HTML: no autoescaping; the template escapes names through |md
    environment = Environment(loader=PackageLoader("skincancer", "templates"), autoescape=False, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters["md"] = _md
    environment.filters["figure"] = lambda value: f"{value:.4f}" if isinstance(value, float) else _md(value)
    return environment


def _md(text) -> str:
    """A name as Markdown text: no table-breaking pipes, no raw HTML."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            .replace("\n", " "))


def _metadata_use(members: list[Classifier]) -> str:
    """Which fields change a prediction: per-field models cover age and sex, age alone, sex alone; a run saved before
    them uses the two only together."""
    models = [m.metadata_model for m in members if m.metadata_model is not None]
    if not models:
        return "not used; the image alone."
    patterns = sorted({kind for model in models for kind in model.parts}, key=["age+sex", "age", "sex"].index)
    given = {"age+sex": "age and sex together", "age": "age alone", "sex": "sex alone"}
    return f"fused with the image when given as {' or '.join(given[p] for p in patterns)}; otherwise the image decides."


def _mode(meta: dict) -> str:
    return {"linear": "ImageNet features, frozen, with a logistic-regression head",
            "finetune": "fine-tuned from ImageNet weights"}.get(meta.get("mode"), str(meta.get("mode")))


def _input(meta: dict) -> str:
    size, trained = meta.get("image_size"), meta.get("train_image_size")
    crop = ", the centre square of a non-square image" if meta.get("resize") == "crop" else ""
    return f"{size} px" + (f" (trained at {trained} px)" if trained and trained != size else "") + crop


def _source(card: dict) -> str:
    return ("out-of-fold predictions over the training and validation images"
            if str(card["validation_source"]).startswith("out-of-fold") else "the validation split")


def _training(member: Classifier, named: bool) -> dict:
    """A run's training record for the card: when, with which code, how long, and the images of each split."""
    meta, env = member.meta, member.meta.get("environment")
    name = f"{_run_name(member)}: " if named else ""
    if not isinstance(env, dict):
        return {"name": name, "recorded": False}
    seconds = meta.get("train_seconds")
    took = "" if not isinstance(seconds, (int, float)) else (
        f"; {seconds:.0f} s" if seconds < 120 else f"; {seconds / 60:.0f} minutes")
    splits = []
    for split, data in (env.get("data") or {}).items():
        if isinstance(data, dict):
            counts = data.get("diagnoses")
            mix = (" (" + ", ".join(f"{diagnosis} {n}" for diagnosis, n in counts.items()) + ")"
                   if isinstance(counts, dict) else "")
            splits.append({"name": split, "images": data.get("images", "?"), "mix": mix,
                           "fingerprint": str(data.get("fingerprint", "?"))[:16]})
    return {"name": name, "recorded": True, "at": env.get("at", ""), "code": describe(env), "took": took,
            "splits": splits}


def _diagnosis_counts(member: Classifier) -> dict[str, int]:
    """Images per diagnosis the model was fitted on, from its training record ({} where it has none): train, plus
    valid for a head fitted on both."""
    env = member.meta.get("environment")
    data = env.get("data") if isinstance(env, dict) else None
    if not isinstance(data, dict):
        return {}
    splits = ["train", "valid"] if str(member.meta.get("validation_source")).startswith("out-of-fold") else ["train"]
    total: dict[str, int] = {}
    for split in splits:
        counts = (data.get(split) or {}).get("diagnoses") if isinstance(data.get(split), dict) else None
        for name, n in (counts or {}).items():
            if isinstance(n, int) and n > 0:
                total[str(name)] = total.get(str(name), 0) + n
    return total


def _trained_diagnoses(members: list[Classifier]) -> list[str]:
    seen: list[str] = []
    for member in members:
        seen += [name for name in _diagnosis_counts(member) if name not in seen]
    return seen


def _balanced(members: list[Classifier]) -> bool:
    return any(m.meta.get("class_balance") in ("weighted_loss", "sampler") for m in members)


def _malignant_share(members: list[Classifier], labels: dict) -> float | None:
    """The malignant share of the images the (first member's) model was fitted on, where its record counts them."""
    counts = _diagnosis_counts(members[0])
    if not sum(counts.values()):
        return None
    return sum(n for name, n in counts.items() if labels.get(name) == 1) / sum(counts.values())


def write_card(classifier: Classifier, path: str | Path) -> Path:
    path = Path(path)
    text = markdown_card(classifier)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
