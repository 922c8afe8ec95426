"""The hostile-input worker: imports vlmkit once, then runs each case in a forked child bounded
in memory (``RLIMIT_AS``: the worker's address space plus :data:`MEMORY_BUDGET`), CPU time
(``RLIMIT_CPU``) and wall time (killed after :data:`WALL_SECONDS`).

Protocol: ``argv[1]`` is a JSON object ``{"cases": [names], "root": scratch folder, "ckpt":
tiny checkpoint folder, "jobs": n}``; one JSON line per case is written to stdout:
``{"case", "outcome": "raised"|"returned"|"killed"|"timeout", "cls", "mro", "message", "value",
"seconds", "signal"}``. A case is a function of :class:`tests.hostile.cases.Ctx` (see there).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

#: Address space each case may add to the worker's (the worker has torch and vlmkit mapped).
MEMORY_BUDGET = 1536 * 1024 * 1024
#: CPU seconds and wall seconds per case.
CPU_SECONDS = 40
WALL_SECONDS = 45


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _bound_self() -> None:
    """Called first thing in the child: the bounds of this case."""
    cap = _vm_size() + MEMORY_BUDGET
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 5))


def _run_child(name: str, root: Path, ckpt: Path, write_fd: int) -> None:
    from tests.hostile.cases import CASES, Ctx

    _bound_self()
    tmp = root / name
    tmp.mkdir(parents=True, exist_ok=True)
    os.chdir(tmp)
    log = os.open(tmp / "stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 2)  # what the case (or the CLI) prints to stderr stays out of pytest's output
    start = time.monotonic()
    result: dict = {"case": name}
    try:
        value = CASES[name].run(Ctx(tmp=tmp, ckpt_source=ckpt))
        result.update(outcome="returned", value=str(value)[:4000])
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the test
        result.update(outcome="raised", cls=type(exc).__name__, mro=[c.__name__ for c in type(exc).__mro__],
                      message=str(exc)[:4000], trace="".join(traceback.format_exception(exc))[-3000:])  # fmt: skip
    result["seconds"] = round(time.monotonic() - start, 3)
    data = json.dumps(result).encode()
    with os.fdopen(write_fd, "wb") as out:
        out.write(data)
    os._exit(0)


def _start(name: str, root: Path, ckpt: Path) -> tuple[int, int, float]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _run_child(name, root, ckpt, write_fd)
        finally:
            os._exit(3)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    return pid, read_fd, time.monotonic()


def _drain(fd: int, buf: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        buf.extend(chunk)


def main() -> None:
    from tests.hostile.cases import warm_up

    args = json.loads(sys.argv[1])
    root, ckpt = Path(args["root"]), Path(args["ckpt"])
    warm_up(ckpt)
    pending = list(args["cases"])
    running: dict[int, tuple[str, int, float, bytearray]] = {}
    while pending or running:
        while pending and len(running) < args.get("jobs", 2):
            name = pending.pop(0)
            pid, fd, t0 = _start(name, root, ckpt)
            running[pid] = (name, fd, t0, bytearray())
        time.sleep(0.02)
        for pid, (name, fd, t0, buf) in list(running.items()):
            _drain(fd, buf)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0 and time.monotonic() - t0 > WALL_SECONDS:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                _report({"case": name, "outcome": "timeout", "seconds": WALL_SECONDS})
            elif done == 0:
                continue
            else:
                _drain(fd, buf)
                if buf:
                    _report(json.loads(bytes(buf)))
                else:
                    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
                    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
                    _report({"case": name, "outcome": "killed", "signal": sig, "exit": code,
                             "seconds": round(time.monotonic() - t0, 3)})  # fmt: skip
            os.close(fd)
            del running[pid]


def _report(result: dict) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import vlmkit  # noqa: F401 - imported once, shared by every forked case
    import vlmkit.cli  # noqa: F401
    import vlmkit.processor  # noqa: F401
    import tests.hostile.cases  # noqa: F401

    main()
