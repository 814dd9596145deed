"""Run the test bed until SIGINT/SIGTERM: ``python -m tests.testbed --workdir DIR [--big-blob-mib N]``.

Prints a JSON description (URLs, credentials, images) to stdout once everything is up.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from .bed import Testbed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None, help="directory for storage, configs and logs")
    parser.add_argument("--big-blob-mib", type=int, default=256, help="size of library/bigimage's layer (MiB)")
    parser.add_argument("--token-ttl", type=int, default=300, help="expires_in of issued tokens (seconds)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the description to this file")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            return
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="testbed-"))
    try:
        with Testbed.start(workdir, big_blob_mib=args.big_blob_mib, token_ttl=args.token_ttl) as bed:
            text = json.dumps(bed.describe(), indent=2)
            if args.json_out is not None:
                args.json_out.write_text(text + "\n")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            print(f"test bed up in {bed.start_seconds:.1f}s; Ctrl-C or SIGTERM stops it", file=sys.stderr)
            while not stop.wait(1.0):
                pass
    except KeyboardInterrupt:
        pass
    print("test bed stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
