# Charges an order: one JSON line in, one out. Until the file `card-fix` exists beside the Pipeline,
# every seventh order is declined, to show the dead-letter queue at work (see the README's "Day 2").
import json, os, sys

for line in sys.stdin:
    msg = json.loads(line)
    order = msg["data"]
    if order["n"] % 7 == 0 and not os.path.exists("card-fix"):
        reply = {"id": msg["id"], "error": "card declined for order %d" % order["n"]}
    else:
        reply = {"id": msg["id"], "outputs": [dict(order, charged=True)]}
    print(json.dumps(reply), flush=True)
