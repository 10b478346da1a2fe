"""Example component: prints a heartbeat line at an interval."""

import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--interval", type=float, default=1.0)
parser.add_argument("--message", default="alive")
args = parser.parse_args()
thing = os.environ.get("AWS_IOT_THING_NAME", "?")
beat = 0
while True:
    beat += 1
    print(f"{thing}: {args.message} (beat {beat})", flush=True)
    time.sleep(args.interval)
