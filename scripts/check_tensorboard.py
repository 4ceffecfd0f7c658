#!/usr/bin/env python3
"""Reads temper's TensorBoard event files with TensorBoard's own loader.

    python scripts/check_tensorboard.py RUNS_DIR

For every run directory under RUNS_DIR that has a `tensorboard/` folder (a run started with
`--report-to tensorboard`, or a pipeline's stages), loads it with TensorBoard's
EventAccumulator and checks that its scalars are the numbers of the run's metrics.jsonl: the
same tags (`SPLIT/FIELD`), the same steps, each value equal in float32. temper's CPU tests read
the files back with temper's own reader; this is the check that TensorBoard reads them too.
Without the `tensorboard` package it says so and exits 0; a mismatch exits 1.
"""

import json
import math
import os
import struct
import sys


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def expected(run):
    want = {}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            for k, v in rec.items():
                if k in ("step", "split"):
                    continue
                # null: a number that was not finite, which TensorBoard holds as it was.
                want.setdefault(f"{rec['split']}/{k}", []).append((rec["step"], None if v is None else f32(float(v))))
    return want


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        print("check_tensorboard: no tensorboard package here; nothing checked")
        return
    runs = sorted(
        root for root, dirs, _ in os.walk(sys.argv[1]) if "tensorboard" in dirs and "metrics.jsonl" in os.listdir(root)
    )
    if not runs:
        sys.exit(f"check_tensorboard: no run under {sys.argv[1]} has a tensorboard/ folder")
    bad = 0
    for run in runs:
        acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        want = expected(run)
        problems = []
        if sorted(got) != sorted(want):
            problems.append(f"tags {sorted(got)} against metrics.jsonl's {sorted(want)}")
        for tag in sorted(set(got) & set(want)):
            g, w = got[tag], want[tag]
            same = len(g) == len(w) and all(
                gs == ws and (gv == wv or (wv is None and not math.isfinite(gv))) for (gs, gv), (ws, wv) in zip(g, w)
            )
            if not same:
                problems.append(f"{tag}: {g[:4]}... against {w[:4]}...")
        n = sum(len(v) for v in got.values())
        status = "ok" if not problems else "MISMATCH"
        print(f"{status} {run}: {len(got)} tags, {n} scalars")
        for p in problems:
            print(f"   {p}")
        bad += bool(problems)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
