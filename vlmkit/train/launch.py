"""``accelerate launch --num_processes N -m vlmkit train ...`` on a machine without GPUs.

accelerate's launcher starts several processes only for ``--multi_gpu`` (torchrun; on CPU the
processes then talk over gloo) or an MPI host file; with a plain ``--num_processes 2`` and no GPU
it silently starts ONE process. So when ``vlmkit train`` finds itself the only process of such a
launch, it hands over to accelerate's own launcher again with ``--multi_gpu`` added (the rest of
the command unchanged): the N processes the user asked for, started by accelerate and torchrun.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["requested_processes", "relaunch_if_needed"]

_GUARD = "VLMKIT_TRAIN_RELAUNCHED"


def _parent_launch_args() -> list[str] | None:
    """The arguments after ``launch`` of the parent ``accelerate launch`` command, or None."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    for i, arg in enumerate(argv[:-1]):
        if arg == "accelerate.commands.launch":  # python -m accelerate.commands.launch ...
            return argv[i + 1 :]
        if Path(arg).name in ("accelerate", "accelerate-launch") or arg.endswith("accelerate/commands/launch.py"):
            rest = argv[i + 1 :]
            return rest[1:] if rest and rest[0] == "launch" else rest
    return None


def requested_processes() -> tuple[int, list[str]] | None:
    """``(N, launch args)`` when an ``accelerate launch --num_processes N>1`` started only this process."""
    if os.environ.get(_GUARD) or "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return None
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ and "ACCELERATE_USE_CPU" not in os.environ:
        return None  # not started by accelerate's launcher
    args = _parent_launch_args()
    if not args:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed = launch_command_parser().parse_args(args)
    except SystemExit:
        return None
    n = parsed.num_processes or 1
    if n < 2 or parsed.multi_gpu or parsed.mpirun_hostfile:
        return None
    return n, args


def relaunch_if_needed() -> None:
    """Replace this process with ``accelerate launch --multi_gpu <same args>`` when needed."""
    found = requested_processes()
    if found is None:
        return
    n, args = found
    sys.stderr.write(f"vlmkit train: accelerate started 1 process for --num_processes {n} (no GPU here); "
                     f"relaunching with --multi_gpu, {n} processes over gloo\n")  # fmt: skip
    sys.stderr.flush()
    env = {**os.environ, _GUARD: "1"}
    os.execve(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", *args], env)
