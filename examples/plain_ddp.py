"""A plain torch DDP script (DistributedSampler + DataLoader + no_sync), to check the toolkit against the loop you
are migrating from: ddp_toolkit with `data.order=distributed_sampler` and the same settings gives the same weights.

    torchrun --nproc-per-node 2 examples/plain_ddp.py --micro-batch-size 4 --grad-accum-steps 2 --epochs 3 \
        --seed 3 --lr 0.2 --out weights.safetensors

Only the data and the model come from ddp_toolkit (the same as data.name=synthetic, model.name=mlp would build).
"""

import argparse
import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ddp_toolkit.data import synthetic_classification
from ddp_toolkit.models import mlp


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, kind, default in [("micro-batch-size", int, 32), ("grad-accum-steps", int, 1), ("epochs", int, 2),
                                ("seed", int, 0), ("lr", float, 0.1), ("momentum", float, 0.9),
                                ("dataset-size", int, 4096), ("eval-size", int, 1001), ("features", int, 32),
                                ("classes", int, 10), ("noise", float, 0.5), ("data-seed", int, 0),
                                ("dtype", str, "float32"), ("out", str, "weights.safetensors")]:
        p.add_argument(f"--{name}", type=kind, default=default)
    p.add_argument("--hidden", type=int, nargs="*", default=[64])
    p.add_argument("--drop-last", action="store_true", help="DistributedSampler(drop_last=True)")
    return p.parse_args()


def train(a: argparse.Namespace) -> None:
    dtype, k = getattr(torch, a.dtype), a.grad_accum_steps
    data, _ = synthetic_classification(a.dataset_size, a.eval_size, a.features, a.classes, a.noise, a.data_seed)
    dataset = TensorDataset(data.x.to(dtype), data.y)
    torch.manual_seed(a.seed)
    model = DistributedDataParallel(mlp(a.features, a.classes, a.hidden).to(dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    sampler = DistributedSampler(dataset, shuffle=True, seed=a.seed, drop_last=a.drop_last)
    loader = DataLoader(dataset, batch_size=a.micro_batch_size, sampler=sampler, drop_last=True)
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        optimizer.zero_grad()  # a partial iteration left from the previous epoch is dropped
        for i, (x, y) in enumerate(loader):
            sync = (i + 1) % k == 0  # all-reduce on the k-th micro-step only
            with contextlib.nullcontext() if sync else model.no_sync():
                (F.cross_entropy(model(x), y, reduction="none").mean() / k).backward()
            if sync:
                optimizer.step()
                optimizer.zero_grad()
    if dist.get_rank() == 0:
        save_file({n: t.detach().contiguous() for n, t in model.module.state_dict().items()}, a.out)


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    try:
        train(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
