"""Print the first few lines of a results JSONL file as a compact table."""

import json
import sys

path, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
with open(path, encoding="utf-8") as f:
    for _, line in zip(range(count), f, strict=False):
        r = json.loads(line)
        text = (r.get("content") or (r.get("error") or {}).get("message", ""))[:60]
        print(
            f"  {r['job_id'][:12]:12} {r['status']:5} {r.get('cache', ''):9} {r.get('model') or '-':22} "
            f"${r.get('cost_usd', 0):.6f}  {text!r}"
        )
