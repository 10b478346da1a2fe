"""Example component: reads a simulated temperature, and crashes now and then."""

import math
import os
import sys
import time

crash_every = float(os.environ.get("CRASH_EVERY", "4"))
start = time.monotonic()
while True:
    t = time.monotonic() - start
    print(f"temperature {21 + 2 * math.sin(t / 3):.2f} C", flush=True)
    if crash_every > 0 and t > crash_every:
        print("sensor bus error: giving up", file=sys.stderr, flush=True)
        sys.exit(3)
    time.sleep(0.5)
