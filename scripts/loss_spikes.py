"""Loss spikes in a run's metrics.jsonl: whether the training loss ever jumped well above the
level it had settled to, the way a run that is about to diverge does (GPT-2 small at the tiny
model's lr 3e-3 went from 11 to 18-21 within 8 steps).

Usage: python3 scripts/loss_spikes.py RUN_DIR_OR_METRICS_JSONL [--skip STEP] [--window N]
                                      [--rise NATS] [--name NAME]

Reads the "split": "train" lines. The baseline is the lowest mean of N consecutive logged
losses so far (default 10: one lucky batch does not set it); after step STEP (default 10: the
first steps' fall is steep), a logged loss more than NATS (default 1.0) above the baseline is
a spike, and so is a non-finite loss at any step. Prints one JSON line {"bench":
"loss_spikes", "run": NAME, "logged", "last_step", "first", "min", "last", "max_rise",
"max_rise_step", "spikes", "first_spike_step", "nonfinite", "skip", "window", "rise"} and
exits 0 whatever it finds (the line says); 2 when the file cannot be read or has no train
loss. scripts/gpu-check.sh runs it on the gpt2 preset's run; it reads any run directory.
"""
import argparse
import json
import math
import os
import sys


def train_losses(path):
    """(step, loss) of each train line in order; a loss serde_json wrote as null is NaN."""
    out = []
    for line in open(path, errors="replace"):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)  # Python reads NaN and Infinity; serde_json writes null
        except ValueError:
            continue
        if not isinstance(r, dict) or r.get("split") != "train" or "loss" not in r:
            continue
        step = r.get("step")
        if not isinstance(step, int):
            continue
        loss = r["loss"]
        out.append((step, float(loss) if isinstance(loss, (int, float)) else float("nan")))
    return out


def summary(losses, skip, window, rise):
    recent, baseline = [], math.inf
    max_rise, max_rise_step, spikes, first_spike, nonfinite = 0.0, None, 0, None, 0
    for step, loss in losses:
        if not math.isfinite(loss):
            nonfinite += 1
            spikes += 1
            first_spike = step if first_spike is None else first_spike
            continue
        if step > skip and baseline < math.inf:
            up = loss - baseline
            if up > max_rise:
                max_rise, max_rise_step = up, step
            if up > rise:
                spikes += 1
                first_spike = step if first_spike is None else first_spike
        recent = (recent + [loss])[-window:]
        if len(recent) == window:
            baseline = min(baseline, sum(recent) / window)
    finite = [l for _, l in losses if math.isfinite(l)]
    return {
        "logged": len(losses),
        "last_step": losses[-1][0],
        "first": finite[0] if finite else None,
        "min": min(finite) if finite else None,
        "last": finite[-1] if finite else None,
        "max_rise": max_rise,
        "max_rise_step": max_rise_step,
        "spikes": spikes,
        "first_spike_step": first_spike,
        "nonfinite": nonfinite,
        "skip": skip,
        "window": window,
        "rise": rise,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--rise", type=float, default=1.0)
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    path = os.path.join(a.run, "metrics.jsonl") if os.path.isdir(a.run) else a.run
    try:
        losses = train_losses(path)
    except OSError as e:
        print(f"{path}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    if not losses:
        print(f"{path}: no train loss lines", file=sys.stderr)
        sys.exit(2)
    line = {"bench": "loss_spikes", "run": a.name or os.path.basename(os.path.dirname(os.path.abspath(path)))}
    line.update(summary(losses, a.skip, max(1, a.window), a.rise))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
