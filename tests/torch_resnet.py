"""A ResNet-18-shaped model (torchvision's layout, defined here so that nothing
needs torchvision), shared by tests/test_torch_api.py and tools/bench_torch.py."""

import torch
from torch import nn


class Block(nn.Module):
    """A basic block: conv-BN-ReLU, conv-BN, the shortcut (a 1x1 conv-BN when the
    shape changes) added, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18(width=64, classes=1000, small_input=False):
    """ResNet-18's layout: a stem, four stages of two basic blocks (width, 2, 4 and
    8 times width channels), average pooling and a linear layer. The defaults are
    torchvision's resnet18 (a 7x7 stride-2 stem and a max pool); small_input
    takes a 3x3 stride-1 stem and no pool instead, for small images."""
    if small_input:
        layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    else:
        layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                  nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, stride in enumerate((1, 2, 2, 2)):
        cout = width << i
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)
