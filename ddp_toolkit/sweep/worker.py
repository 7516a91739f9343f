"""`python -m ddp_toolkit.sweep.worker CONFIG`: one worker of a sweep point under torch.distributed.run.

It trains like `ddp-toolkit train CONFIG` and, on rank 0, records how training ended in run_dir/outcome.json,
so the sweep reads a divergence from the error type the trainer raised, not from the log.
"""

from __future__ import annotations

import sys

from ddp_toolkit.config import load_config
from ddp_toolkit.errors import ToolkitError


def main(argv: list[str] | None = None) -> int:
    from ddp_toolkit.sweep.execution import train_recording

    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(args[0])
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    outcome = train_recording(cfg)
    if outcome["status"] != "finished":
        print(f"error: {outcome['error']}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
