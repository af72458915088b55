"""The torchrun supervisor: re-run a `train` command under torchrun, relay rank 0's output, pass a stop on, and say
how to go on after one."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from .config import config_to_dict
from .resume import resume_processes


class LaunchError(Exception):
    """A multi-process run that did not finish; the message says why and how to go on."""


def torchrun(nproc: int, cfg, resume: bool, overwrite: bool) -> None:
    """Re-run this very command under torchrun with N processes (gloo on CPU, nccl on CUDA); returns when they
    finished, raises LaunchError saying what happened (and how to go on) when they did not."""

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--local-ranks-filter=0", "-m", "skincancer", *args]  # the workers' output: rank 0's
    print(f"launching: {' '.join(command)}", file=sys.stderr)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    # A signal to stop: this process keeps relaying torchrun's last lines until it has stopped its workers, then
    # says in one line how to go on (instead of dying first and leaving them writing into a closed pipe). A
    # SIGTERM (a scheduler's cancel, `kill`) is passed on; a terminal's Ctrl-C or hang-up reaches torchrun itself.
    stopped: list[int] = []

    def forward(signum, frame):
        stopped.append(signum)
        process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    for quiet in (signal.SIGINT, signal.SIGHUP):
        signal.signal(quiet, lambda signum, frame: stopped.append(signum))
    held: list[str] = []  # torchrun's own report of a failed worker: shown only if the worker said nothing clear
    named = False
    for line in process.stderr:
        if held or re.match(r"[WE]\d{4} \d\d:\d\d", line) or line.startswith("Traceback (most recent call last)"):
            held.append(line)
            continue
        named = named or line.startswith("error: ")
        sys.stderr.write(line)
    code = process.wait()
    if code == 0:
        sys.stderr.writelines(held)
        return
    if stopped:  # torchrun's traceback of the signal says nothing more
        raise LaunchError(f"training stopped by {signal.Signals(stopped[0]).name}; "
                          f"{how_to_go_on(cfg, nproc, resume, overwrite)}")
    if not named:
        sys.stderr.writelines(held)
    raise LaunchError(f"training stopped (torchrun exit code {code}){'; the error is above' if named else ''}")


def how_to_go_on(cfg, nproc: int, resume: bool, overwrite: bool) -> str:
    """After a stopped multi-process run: `--resume` where the folder holds this run's checkpoint, else start
    again (an --overwrite start stopped before it had cleared the old run leaves the old run's checkpoint)."""
    out = Path(cfg.out)
    try:
        same = resume or yaml.safe_load((out / "config.yaml").read_text()) == config_to_dict(cfg)
    except (OSError, yaml.YAMLError):
        same = False
    if same and resume_processes(out) is not None:
        return f"`skincancer train --resume {out} --nproc {nproc}` continues it from its last complete epoch"
    again = "nothing was kept to resume: run the command again"
    if not overwrite and (out / "train.log").is_file():
        again += f" with --overwrite (it replaces what it had written in {out})"
    return again
