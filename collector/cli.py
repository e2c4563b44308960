"""The `routelens` command."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="routelens", description="Make Ray Serve request routing observable.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="trace the seed's routers and Ray's default router on a local Ray Serve, then summarize",
        description="Start a local Ray Serve, deploy the Ray custom-routing guide's two apps and a pow-2 "
                    "deployment with traced routers, send traffic through HTTP and a handle, and print "
                    "what the tracer recorded.",
    )
    demo.add_argument("--dir", default="routelens-demo", help="where the decision logs go (default: %(default)s)")
    demo.add_argument("--requests", type=int, default=100,
                      help="requests per app and per path, HTTP and handle (default: %(default)s)")
    demo.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.requests <= 0:
            parser.error("--requests must be positive")
        from collector import demo as demo_job

        demo_job.run(args.dir, args.requests, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
