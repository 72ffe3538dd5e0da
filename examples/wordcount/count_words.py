"""Map step of the example job: count the words and lines of one text file.

Run by mrpool once per item as `python3 count_words.py PATH`; prints a JSON
result on stdout. A missing file exits 1 with a message on stderr, which mrpool
records as a failure and, after the retries, parks in the dead letter queue.
"""

import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
try:
    text = path.read_text(encoding="utf-8")
except FileNotFoundError:
    sys.exit(f"no such file: {path}")
words = text.split()
print(json.dumps({"path": str(path), "lines": text.count("\n"), "words": len(words),
                  "longest": max(words, key=len) if words else None}))
