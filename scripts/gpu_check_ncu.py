"""ncu's per-kernel summary (--print-summary per-kernel --csv) as gpu-check results lines:
{"bench": BENCH, "kernel", "kind", "launches", "ms", "share"}, each kernel classed as ours
(its name is an entry point of kernels/*.cu), cuBLAS, or other (candle's or the runtime's).

Usage: python3 scripts/gpu_check_ncu.py NCU_CSV KERNEL_DIR BENCH >> results.jsonl
"""
import csv, glob, json, re, sys
# Our kernels by name prefix, read from kernels/*.cu (the repository travels with the call).
ours = set()
for f in glob.glob(f"{sys.argv[2]}/*.cu*"):
    src = open(f).read()
    for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^()]*(?:\([^()]*\))?[^()]*\)\s*\\?\s*)?(\w+?)(?:##|\()", src):
        ours.add(m.group(1))
rows = list(csv.reader(open(sys.argv[1])))
if not rows:
    sys.exit()
head = [h.strip().lower() for h in rows[0]]
def find(key):
    return next((i for i, h in enumerate(head) if h == key), None)
col = {k: find(k) for k in ["kernel name", "invocations", "metric name", "metric unit", "average"]}
def kind(name):
    base = name.split("(")[0].split("<")[0].strip()
    if any(base.startswith(o) for o in ours):
        return "attention (ours)" if base.startswith("attn_") else "temper kernel"
    if re.search(r"gemm|xmma|cutlass|nvjet|cublas|splitKreduce", name, re.I):
        return "cuBLAS"
    return "other (candle's or the runtime's)"
kernels = {}
for r in rows[1:]:
    try:
        name = r[col["kernel name"]]
        n = int(float(r[col["invocations"]].replace(",", "")))
        if col["metric name"] is not None and r[col["metric name"]] != "gpu__time_duration.sum":
            continue
        avg = float(r[col["average"]].replace(",", ""))
        unit = r[col["metric unit"]] if col["metric unit"] is not None else "nsecond"
    except (TypeError, ValueError, IndexError):
        continue
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
    k = kernels.setdefault(name, [0, 0.0])
    k[0] += n
    k[1] += n * avg * scale
total = sum(v[1] for v in kernels.values()) or 1.0
for name, (n, ms) in kernels.items():
    print(json.dumps({"bench": sys.argv[3], "kernel": name[:120], "kind": kind(name), "launches": n,
                      "ms": ms, "share": ms / total}))
