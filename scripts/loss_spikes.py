"""Loss spikes in a run's metrics.jsonl: whether the training loss ever climbed well above the
lowest it had reached, the way a run that is about to diverge does (GPT-2 small at the tiny
model's lr 3e-3 went from 11 to 18-21 within 8 steps).

Usage: python3 scripts/loss_spikes.py RUN_DIR_OR_METRICS_JSONL [--skip N] [--rise NATS] [--name NAME]

Reads the "split": "train" lines. After the first N logged steps (default 10: the first
steps' fall is steep and noisy), a step whose loss exceeds the running minimum by more than
NATS (default 0.5) is a spike; so is a non-finite loss anywhere. Prints one JSON line
{"bench": "loss_spikes", "run": NAME, "steps", "first", "min", "last", "max_rise",
"max_rise_step", "spikes", "first_spike_step", "nonfinite"} and exits 0 whatever it finds
(the line says), 2 when the file has no train loss. scripts/gpu-check.sh runs it on the gpt2
preset's run; it works on any run directory.
"""
import argparse
import json
import math
import os
import sys


def train_losses(path):
    out = []
    for line in open(path, errors="replace"):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)  # Python reads NaN and Infinity; serde_json writes null
        except ValueError:
            continue
        if r.get("split") != "train" or "loss" not in r or "step" not in r:
            continue
        loss = r["loss"]
        loss = float(loss) if isinstance(loss, (int, float)) else float("nan")
        out.append((int(r["step"]), loss))
    return out


def summary(losses, skip, rise):
    finite = [(s, l) for s, l in losses if math.isfinite(l)]
    nonfinite = [s for s, l in losses if not math.isfinite(l)]
    best = math.inf
    max_rise, max_rise_step, spikes, first_spike = 0.0, None, 0, None
    for i, (step, loss) in enumerate(losses):
        if not math.isfinite(loss):
            continue
        if i >= skip and best < math.inf:
            up = loss - best
            if up > max_rise:
                max_rise, max_rise_step = up, step
            if up > rise:
                spikes += 1
                first_spike = step if first_spike is None else first_spike
        best = min(best, loss)
    if nonfinite:
        spikes += len(nonfinite)
        first_spike = min([first_spike, nonfinite[0]], key=lambda s: math.inf if s is None else s)
    return {
        "steps": len(losses),
        "first": finite[0][1] if finite else None,
        "min": min(l for _, l in finite) if finite else None,
        "last": finite[-1][1] if finite else None,
        "max_rise": max_rise,
        "max_rise_step": max_rise_step,
        "spikes": spikes,
        "first_spike_step": first_spike,
        "nonfinite": len(nonfinite),
        "skip": skip,
        "rise": rise,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--rise", type=float, default=0.5)
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    path = os.path.join(a.run, "metrics.jsonl") if os.path.isdir(a.run) else a.run
    losses = train_losses(path)
    if not losses:
        print(f"{path}: no train loss lines", file=sys.stderr)
        sys.exit(2)
    line = {"bench": "loss_spikes", "run": a.name or os.path.basename(os.path.dirname(os.path.abspath(path)))}
    line.update(summary(losses, a.skip, a.rise))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
