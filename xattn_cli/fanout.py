"""`--device cuda:all`: one worker process per device, each over its part of the inputs, into one --out.

The parent re-runs its own command line once per device with `--device <that device> --format jsonl
--quiet`, and tells each worker its part through `WORKER_ENV` ("i/n": every n-th input from the i-th, of
the inputs the run would explain — after any --shard, so a Slurm array job can give each node all its
GPUs). Every worker expands the same arguments (stdin, when read, is handed to each of them whole), so
artifact names are the ones a single process would choose. The manifest's lock keeps their records whole;
the parent relays each worker's JSON lines whole, and exits with the worst exit code among them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO

WORKER_ENV = "XATTN_DEVICE_WORKER"
EXIT_PRECEDENCE = (130, 2, 1, 0)  # interrupted over usage errors over failed items over success


def worker_part(environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(i, n) when this process is worker i of n of a `cuda:all` run; None otherwise."""
    value = (os.environ if environ is None else environ).get(WORKER_ENV)
    if not value:
        return None
    index, count = (int(part) for part in value.split("/"))
    return index, count


def with_device(argv: Sequence[str], device: str) -> list[str]:
    """`argv` with every `--device X` / `--device=X` set to `device`."""
    rewritten, values_next = [], False
    for argument in argv:
        if values_next:
            rewritten.append(device)
            values_next = False
        elif argument == "--device":
            rewritten.append(argument)
            values_next = True
        elif argument.startswith("--device="):
            rewritten.append(f"--device={device}")
        else:
            rewritten.append(argument)
    return rewritten


def run_per_device(argv: Sequence[str], devices: Sequence[str], *, stdin_text: str | None,
                   on_line: Callable[[str], None]) -> int:
    """Run `xattn <argv>` once per device as worker i of len(devices); each JSON line of their stdout goes to
    `on_line` whole (from one thread at a time). The worst exit code (see EXIT_PRECEDENCE)."""
    lock = threading.Lock()
    workers: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    try:
        for index, device in enumerate(devices):
            command = [sys.executable, "-m", "xattn_cli", *with_device(argv, device), "--format", "jsonl", "--quiet"]
            environment = {**os.environ, WORKER_ENV: f"{index}/{len(devices)}"}
            worker = subprocess.Popen(command, env=environment, text=True, encoding="utf-8",
                                      stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                                      stdout=subprocess.PIPE)
            workers.append(worker)
            if stdin_text is not None:
                relays.append(threading.Thread(target=_feed, args=(worker.stdin, stdin_text), daemon=True))
            relays.append(threading.Thread(target=_relay, args=(worker.stdout, lock, on_line), daemon=True))
        for relay in relays:
            relay.start()
        codes = [worker.wait() for worker in workers]
        for relay in relays:
            relay.join()
    except KeyboardInterrupt:
        for worker in workers:  # they got the terminal's SIGINT too; wait for them to flush their records
            worker.wait()
        raise
    known = [code if code in EXIT_PRECEDENCE else 1 for code in codes]  # a worker killed by a signal lost items
    return min(known, key=EXIT_PRECEDENCE.index)


def _feed(stdin: IO[str], text: str) -> None:
    with stdin:
        stdin.write(text)


def _relay(stdout: IO[str], lock: threading.Lock, on_line: Callable[[str], None]) -> None:
    for line in stdout:
        if line.strip():
            with lock:
                on_line(line.rstrip("\n"))
