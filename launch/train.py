"""The one entry script every launcher runs: torchrun, accelerate launch, deepspeed and srun.

    torchrun --nproc-per-node 2 launch/train.py configs/default.yaml [key.path=value ...]
"""

import sys

from ddp_toolkit.cli import main

if __name__ == "__main__":
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    args = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    sys.exit(main(["train", *args]))
