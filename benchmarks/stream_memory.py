"""Peak resident memory of a long `xattn surgery` run: after 100 images vs after all of them.

    python stream_memory.py [--images 1000] [--size 224] [--workers N]

Writes the scenes to a temporary folder, runs the real CLI in a subprocess, samples the resident size of
the run (and of its decoding workers) every 50 ms, and prints the peaks at each checkpoint. The target
(issue 7): the peak after 1,000 images within 200 MB of the peak after 100.
"""
from __future__ import annotations

import argparse
import json
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xattn_cli.world.shapes import scene_at


def resident_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=str, default=None)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[100, 500, 1000])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xattn-stream-"))
    try:
        folder = work / "images"
        folder.mkdir()
        for index in range(args.images):
            scene_at(777, index, size=args.size).image.save(folder / f"{index:05d}.png")
        command = [sys.executable, "-m", "xattn_cli", "surgery", str(folder), "--text", "a red circle",
                   "--text", "a blue star", "--out", str(work / "out"), "--save-maps", "-f", "jsonl", "-q"]
        if args.workers is not None:
            command += ["--workers", args.workers]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        records, peak_main, peak_total, peaks = 0, 0.0, 0.0, {}
        checkpoints = sorted(c for c in args.checkpoints if c <= args.images)
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            main_mb = resident_mb(process.pid)
            total_mb = main_mb + sum(resident_mb(child) for child in children(process.pid))
            peak_main, peak_total = max(peak_main, main_mb), max(peak_total, total_mb)
            if selector.select(timeout=0.05):
                line = process.stdout.readline()
                if not line:
                    break
                records += json.loads(line)["status"] == "ok"
                if checkpoints and records >= checkpoints[0]:
                    peaks[checkpoints.pop(0)] = (peak_main, peak_total, time.perf_counter() - started)
        process.wait()
        if process.returncode != 0:
            raise SystemExit(f"xattn exited {process.returncode}: {process.stderr.read()[-500:]}")
        print(f"{records} images ok in {time.perf_counter() - started:.1f} s: xattn {' '.join(command[3:])}")
        print(f"{'after':>6} {'peak RSS main (MB)':>19} {'with workers (MB)':>18} {'seconds':>8}")
        for count, (main_mb, total_mb, seconds) in peaks.items():
            print(f"{count:6d} {main_mb:19.0f} {total_mb:18.0f} {seconds:8.1f}")
        first, last = peaks[min(peaks)], peaks[max(peaks)]
        print(f"growth from {min(peaks)} to {max(peaks)} images: {last[0] - first[0]:+.0f} MB main, "
              f"{last[1] - first[1]:+.0f} MB with workers (target: ≤ 200 MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
