# Whether an order's item is in stock: one answer per order, a stand-in for an inventory lookup.
import json, sys

for line in sys.stdin:
    msg = json.loads(line)
    order = msg["data"]["order"]
    answer = {"order": order, "in_stock": order % 7 != 0}
    print(json.dumps({"id": msg["id"], "outputs": [answer]}), flush=True)
