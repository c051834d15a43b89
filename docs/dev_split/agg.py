"""Dev ROUGE-L per method over seeds, and the paired difference to concat (section 1's table).

    python docs/dev_split/agg.py [--categories]     # reads runs/devsweep/eval/<method>_s<seed>/results.json
"""

import collections
import glob
import json
import os
import statistics
import sys

rows = collections.defaultdict(dict)
for f in sorted(glob.glob("runs/devsweep/eval/*/results.json")):
    method, seed = os.path.basename(os.path.dirname(f)).rsplit("_s", 1)
    with open(f) as fh:
        rows[method][int(seed)] = json.load(fh)
base = rows.get("concat", {})
for method, by_seed in rows.items():
    vals = [by_seed[s]["rougeL"] for s in sorted(by_seed)]
    diff = [by_seed[s]["rougeL"] - base[s]["rougeL"] for s in sorted(by_seed) if s in base]
    mflops = statistics.mean(r["cost"]["flops_per_example"] for r in by_seed.values()) / 1e6
    print(f"{method:16s} {statistics.mean(vals):6.2f}  per seed {' '.join(f'{v:5.2f}' for v in vals)}  "
          f"vs concat {' '.join(f'{x:+5.2f}' for x in diff)}  {mflops:6.1f} MFLOPs")
if "--categories" in sys.argv:
    cats = sorted({c for d in rows.values() for r in d.values() for c in r["per_category"]})
    print("category      ", *[m[:8] for m in rows])
    for c in cats:
        means = [statistics.mean(r["per_category"][c]["rougeL"] for r in d.values()) for d in rows.values()]
        print(f"{c[:14]:14s}", *[f"{v:8.1f}" for v in means])
