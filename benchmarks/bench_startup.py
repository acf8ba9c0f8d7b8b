"""Start-up time of the library and the command line, each case in a fresh Python process.

    python benchmarks/bench_startup.py [--reps 5] [--cases TEXT]

Each case is `python -c ...` or `python -m tlora_hooks ...` in a new process (wall time, interpreter start
included), interleaved across repetitions; medians. The imports torch, diffusers and LyCORIS are timed alone for
scale. Prints a table and a `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC = "enable_tlora, disable_tlora, load_tlora, unload_tlora, TLoRAError"

# name: the arguments after `python`
CASES = {
    "python (nothing imported)": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import torch, diffusers": ["-c", "import torch, diffusers"],
    "import lycoris (deferred by tlora_hooks)": ["-c", "import lycoris"],
    "import tlora_hooks": ["-c", "import tlora_hooks"],
    "from tlora_hooks import (public names)": ["-c", f"from tlora_hooks import {PUBLIC}"],
    "tlora-hooks --help": ["-m", "tlora_hooks", "--help"],
    "tlora-hooks schedule": ["-m", "tlora_hooks", "schedule"],
    "tlora-hooks schedule --scheduler euler": ["-m", "tlora_hooks", "schedule", "--scheduler", "euler"],
    "tlora-hooks support": ["-m", "tlora_hooks", "support"],
}


def seconds(arguments: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    subprocess.run([sys.executable, *arguments], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cases", default="", help="only the cases whose name contains this text")
    args = parser.parse_args()
    names = [name for name in CASES if args.cases in name]
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(args.reps + 1):  # the first round (cold file cache) is untimed
        order = names[repetition % len(names):] + names[: repetition % len(names)]
        for name in order:
            elapsed = seconds(CASES[name])
            if repetition:
                samples[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"{'case':58}{'median s':>10}{'min s':>8}")
    for name in names:
        print(f"{name:58}{medians[name]:10.2f}{min(samples[name]):8.2f}")
    result = dict(
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(), cpus=os.cpu_count(),
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None, python=platform.python_version(),
        torch=version("torch"), diffusers=version("diffusers"), lycoris=version("lycoris-lora"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), reps=args.reps,
        median_seconds={name: round(value, 3) for name, value in medians.items()},
    )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
