"""A separate process that writes or reads an exit database, for the concurrency and crash tests.

python -m tests.exit_db_worker write URI COLLECTION START STOP [--batch 100] [--sleep-s 0] [--token T]
python -m tests.exit_db_worker read URI COLLECTION --seconds 3 [--token T]
Prints one line per acknowledged batch ("ok <stop id>") or per search round, then "done".
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from milvus.exit_db import ExitDB
from tests.fixtures_milvus import TEST_META, make_exit_records


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["write", "read"])
    parser.add_argument("uri")
    parser.add_argument("collection")
    parser.add_argument("start", type=int, nargs="?", default=0)
    parser.add_argument("stop", type=int, nargs="?", default=0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--sleep-s", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    with ExitDB(args.uri, collection=args.collection, meta=TEST_META, token=args.token, timeout_s=30.0) as db:
        print("open", flush=True)
        if args.mode == "write":
            for lo in range(args.start, args.stop, args.batch):
                hi = min(lo + args.batch, args.stop)
                db.upsert(make_exit_records(np.arange(lo, hi)))
                print(f"ok {hi}", flush=True)
                time.sleep(args.sleep_s)
        else:
            queries = make_exit_records(np.arange(0, 4)).vectors
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                nb = db.search(queries, k=5)
                print(f"read {int(nb.valid.sum())}", flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
