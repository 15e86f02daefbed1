"""Your model: any nn.Module; the config's other keys are its constructor's arguments."""

from torch import nn


class Classifier(nn.Module):
    def __init__(self, inputs: int = 12, width: int = 32, classes: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, classes))

    def forward(self, x):
        return self.net(x)
