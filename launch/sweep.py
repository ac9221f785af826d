"""Entry point for `ray submit cluster.yaml launch/sweep.py -- --space ...`.

`ray submit` copies only this file to the head node, so it imports the vidtune package that the
cluster's setup commands installed on every node. Started by `ray submit` (RAY_ADDRESS is set or a
cluster is running), it connects with --address auto; on a laptop it starts a local Ray.
"""

import os
import sys

from vidtune.cli import build_parser, main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--address" not in argv and (os.environ.get("RAY_ADDRESS") or os.path.exists("/tmp/ray/ray_current_cluster")):
        argv += ["--address", "auto"]
    build_parser()  # same flags as `vidtune sweep`
    sys.exit(main(["sweep", *argv]))
