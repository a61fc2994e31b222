# Washes each item: one JSON line in, one JSON line out (the exec line protocol).
import json, sys

for line in sys.stdin:
    msg = json.loads(line)
    print(json.dumps({"id": msg["id"], "outputs": [dict(msg["data"], washed=True)]}), flush=True)
