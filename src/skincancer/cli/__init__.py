"""Command line: parses arguments and calls the package's modules; no logic of its own."""

from __future__ import annotations

import logging
import sys

import typer

from .. import NOTICE
from ..errors import BackboneError, CheckpointError, ConfigError, DataError
from ..progress import other_rank
from . import data, evaluation, prediction, service, training

# The modules that do the work import torch, pandas and scikit-learn: each command imports what it needs inside it,
# so that `--help` answers at once.

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help=f"Melanoma vs benign skin lesion classifier. {NOTICE}")
KNOWN_ERRORS = (DataError, ConfigError, CheckpointError, BackboneError, FileNotFoundError)
for command in (data.index, data.preview, training.train, training.distill, evaluation.evaluate, evaluation.compare,
                prediction.predict, training.card, training.guard, service.export, service.serve, service.download):
    app.command()(command)


def main() -> None:
    # under a torchrun started by hand every rank prints: the others' progress would repeat rank 0's
    level = logging.WARNING if other_rank() else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        app()
    except KNOWN_ERRORS as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # the file system said no (a path taken by a file, no permission, disk full...)
        typer.echo(f"error: {_os_error(err)}", err=True)
        sys.exit(2)


def _os_error(err: OSError) -> str:
    if err.filename is None:
        return str(err)
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        return f"{err.filename}: a file is in the way of a folder this command writes (choose another output path)"
    return f"{err.filename}: {err.strerror or err}"


if __name__ == "__main__":
    main()
