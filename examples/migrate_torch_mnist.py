"""GRACE's examples/torch/pytorch_mnist.py, moved to grace-dl (docs/migrating-from-grace.md).

The same structure (argparse, Horovod, a DistributedSampler, a small CNN, SGD, a
grace_from_params method, train/test with averaged metrics), on scikit-learn's bundled
8x8 digits instead of a downloaded MNIST. The lines that differ from a GRACE script are
marked "grace-dl:". Run: ``horovodrun -np 2 python examples/migrate_torch_mnist.py``.
"""

import argparse
import hashlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torch.utils.data.distributed
from sklearn.datasets import load_digits

import grace_dl.torch.hvd as hvd  # grace-dl: was `import horovod.torch as hvd`
from grace_dl.torch.helper import grace_from_params

parser = argparse.ArgumentParser(description="PyTorch digits example (GRACE's pytorch_mnist, on grace-dl)")
parser.add_argument("--batch-size", type=int, default=16, help="input batch size for training (default: 16)")
parser.add_argument("--epochs", type=int, default=3, help="number of epochs to train (default: 3)")
parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default: 0.05)")
parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
parser.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
parser.add_argument("--log-interval", type=int, default=10, help="batches between log lines (default: 10)")
args = parser.parse_args()

# Horovod: initialize library.
hvd.init()
torch.manual_seed(args.seed)
torch.set_num_threads(1)

# scikit-learn's digits: 1,797 8x8 images; the last 297 are the test set
digits = load_digits()
images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
labels = torch.tensor(digits.target, dtype=torch.int64)
train_dataset = torch.utils.data.TensorDataset(images[:1500], labels[:1500])
test_dataset = torch.utils.data.TensorDataset(images[1500:], labels[1500:])
# Horovod: use DistributedSampler to partition the training and test data.
train_sampler = torch.utils.data.distributed.DistributedSampler(
    train_dataset, num_replicas=hvd.size(), rank=hvd.rank(), seed=args.seed)
train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler)
test_sampler = torch.utils.data.distributed.DistributedSampler(
    test_dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=100, sampler=test_sampler)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


model = Net()

# Horovod: scale learning rate by the number of workers.
optimizer = optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=args.momentum)

# Horovod: broadcast parameters & optimizer state.
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

# GRACE: compression algorithm.
params = {'compressor': 'topk', 'memory': 'residual', 'communicator': 'allgather'}
grc = grace_from_params(params)

# Horovod: wrap optimizer with DistributedOptimizer.
optimizer = hvd.DistributedOptimizer(optimizer, grc, named_parameters=model.named_parameters())


def train(epoch):
    model.train()
    # Horovod: set epoch to sampler for shuffling.
    train_sampler.set_epoch(epoch)
    for batch_idx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0 and hvd.rank() == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_sampler)}]\tLoss: {loss.item():.6f}")


def metric_average(val, name):
    return hvd.allreduce(torch.tensor(val), name=name).item()


def test():
    model.eval()
    test_loss, test_accuracy = 0.0, 0.0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            test_accuracy += (output.argmax(1) == target).float().sum().item()
    # Horovod: average metric values across workers.
    test_loss = metric_average(test_loss / len(test_sampler), "avg_loss")
    test_accuracy = metric_average(test_accuracy / len(test_sampler), "avg_accuracy")
    if hvd.rank() == 0:
        print(f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {100.0 * test_accuracy:.2f}%\n")
    return test_accuracy


for epoch in range(1, args.epochs + 1):
    train(epoch)
    accuracy = test()

# every rank applied the same aggregated gradients: the parameters agree bit for bit
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
gathered = hvd.allgather(flat.unsqueeze(0), name="final_parameters")
assert all(torch.equal(gathered[0], row) for row in gathered), "parameters differ between ranks"
print(f"rank {hvd.rank()}: parameters identical on every rank ({digest}), test accuracy {accuracy:.3f}")
