# Splits each message's text into words: one output message per word.
import json, sys

for line in sys.stdin:
    msg = json.loads(line)
    print(json.dumps({"id": msg["id"], "outputs": [{"word": w} for w in msg["data"]["text"].split()]}), flush=True)
