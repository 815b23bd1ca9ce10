import torch
from torch import nn


class Batches:
    """Re-reads its shards every epoch; the second pass finds one missing."""

    def __init__(self):
        self.epoch = 0

    def __iter__(self):
        self.epoch += 1
        for shard in range(2):
            if self.epoch == 2 and shard == 1:
                raise FileNotFoundError("shard-0001.pt vanished")  # DATA LINE
            x = torch.randn(8, 4)
            yield x, x.sum(1, keepdim=True)


def build_model():
    return nn.Linear(4, 1)


def build_data():
    return Batches()


loss_fn = nn.MSELoss()
