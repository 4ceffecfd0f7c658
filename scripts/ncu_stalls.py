"""Where a kernel's warps wait, instruction by instruction: ncu's source page of a report
profiled with --section SourceCounters (PC sampling), exported with
`ncu --import R --page source --csv --print-source sass`, summarised as text: the samples by
stall reason over the whole kernel, then the SASS instructions holding the most samples with
their largest reasons. The export's column names vary across ncu versions, so columns are
found by what their names contain; where none is found the export's first lines are printed
as they are, for whoever adapts this next.

Usage: python3 scripts/ncu_stalls.py SOURCE_CSV [TOP]
"""
import csv, sys

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
text = open(path, errors="replace").read()
rows = [r for r in csv.reader(text.splitlines()) if r]


def number(cell):
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return None


# The header: the first row naming an address or source column.
head_at = next((i for i, r in enumerate(rows)
                if any(c.strip().lower() in ("address", "source") for c in r)), None)
if head_at is None:
    print("ncu_stalls: no source table in the export; its first lines:")
    print("\n".join(text.splitlines()[:40]))
    sys.exit()
head = [c.strip() for c in rows[head_at]]
low = [h.lower() for h in head]
body = [r for r in rows[head_at + 1:] if len(r) == len(head) and r != rows[head_at]]
addr = next((i for i, h in enumerate(low) if h == "address"), None)
src = next((i for i, h in enumerate(low) if h == "source"), None)
# All samples of a row: "Warp Stall Sampling (All Samples)" in the versions seen documented.
total_col = next((i for i, h in enumerate(low) if "sampling" in h and "all samples" in h), None)
if total_col is None:
    total_col = next((i for i, h in enumerate(low) if "sampl" in h), None)
# Per-reason columns: named after a stall (stall_barrier, "Stall Long Scoreboard", ...).
reasons = [i for i, h in enumerate(low) if "stall" in h and i != total_col and "sampling" not in h]
if total_col is None and not reasons:
    print("ncu_stalls: no sampling columns; the header was:")
    print(" | ".join(head))
    print("\n".join(text.splitlines()[head_at + 1:head_at + 20]))
    sys.exit()


def samples(r):
    if total_col is not None:
        return number(r[total_col]) or 0.0
    return sum(number(r[i]) or 0.0 for i in reasons)


grand = sum(samples(r) for r in body) or 1.0
print(f"{len(body)} SASS instructions, {grand:.0f} samples"
      f" ({head[total_col] if total_col is not None else 'sum of the stall columns'})")
if reasons:
    sums = sorted(((sum(number(r[i]) or 0.0 for r in body), head[i]) for i in reasons),
                  reverse=True)
    print("by reason:")
    for s, name in sums:
        if s > 0:
            print(f"  {100 * s / grand:5.1f}%  {name}")
print(f"top {top} instructions:")
for r in sorted(body, key=samples, reverse=True)[:top]:
    s = samples(r)
    if s <= 0:
        break
    why = sorted(((number(r[i]) or 0.0, head[i]) for i in reasons), reverse=True)[:3]
    why = ", ".join(f"{name} {v:.0f}" for v, name in why if v > 0)
    where = r[addr] if addr is not None else ""
    code = r[src].strip() if src is not None else ""
    print(f"  {100 * s / grand:5.1f}%  {where:>8}  {code[:60]:<60}  {why}")
