"""Reduce step of the example job: total the per-file counts (JSONL on stdin)."""

import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip()]
print(json.dumps({"files": len(rows), "lines": sum(r["lines"] for r in rows), "words": sum(r["words"] for r in rows)}))
