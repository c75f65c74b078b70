"""Train a small MLP on scikit-learn's bundled handwritten digits with Horovod and a
grace-dl compressor, then print the loss, the test accuracy and the bytes exchanged.

    horovodrun -np 2 --gloo python examples/torch_horovod_digits.py --method topk --ratio 0.05

Each rank trains on its own shard of the training set; gradients are exchanged by
Horovod's stock DistributedOptimizer with ``compression=`` a grace-dl method.
"""

from __future__ import annotations

import argparse

import horovod.torch as hvd
import torch
from sklearn.datasets import load_digits

import grace_dl.torch as grace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="topk", help=f"one of {grace.list_methods()}")
    parser.add_argument("--ratio", type=float, default=None, help="ratio of sparsifiers")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    x_test, y_test, x_train, y_train = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    x_train, y_train = x_train[hvd.rank()::hvd.size()], y_train[hvd.rank()::hvd.size()]

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    params = {"ratio": args.ratio} if args.ratio is not None else {}
    compression = getattr(grace, args.method)(**params)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        named_parameters=model.named_parameters(), compression=compression)

    batch = 32
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        total = 0.0
        steps = len(x_train) // batch
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            total += loss.item()
        mean_loss = hvd.allreduce(torch.tensor(total / steps), name="loss").item()
        if hvd.rank() == 0:
            print(f"epoch {epoch + 1:2d}  loss {mean_loss:.4f}", flush=True)

    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    stats = compression.grace.stats
    if hvd.rank() == 0:
        print(f"method {args.method}: {compression.grace!r}")
        print(f"test accuracy {accuracy:.3f}; per worker: {stats.dense / 1e6:.2f} MB of gradients, "
              f"{stats.payload / 1e6:.3f} MB of payload (ratio {stats.compression_ratio:.1f}x), "
              f"{stats.sent / 1e6:.3f} MB sent")


if __name__ == "__main__":
    main()
