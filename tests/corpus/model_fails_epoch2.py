import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("buffer overflow in the custom layer")  # MODEL LINE
        return self.fc(x)


def build_model():
    return Net()


def build_data():
    x = torch.randn(16, 4)
    y = x.sum(1, keepdim=True)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


loss_fn = nn.MSELoss()
