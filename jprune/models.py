"""Reference Flax models. Widths are constructor arguments, so a compacted model can be rebuilt."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class LeNet300(nn.Module):
  """LeNet-300-100 (LeCun et al. 1998; Han et al. 2015): 784 → 300 → 100 → classes."""
  widths: Sequence[int] = (300, 100)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for w in self.widths:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
  """LeNet-5 as in Caffe and Han et al. 2015: conv 20@5x5 → pool → conv 50@5x5 → pool → 500 → classes.

  `channels=(6, 16), widths=(120, 84)` gives LeCun's original sizes.
  """
  channels: Sequence[int] = (20, 50)
  widths: Sequence[int] = (500,)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.channels[0], (5, 5), padding="SAME")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(self.channels[1], (5, 5), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    for w in self.widths:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(self.num_classes)(x)


class SimpleCNN(nn.Module):
  """The seeds' CIFAR-10 SimpleCNN: two 5x5 convs with pooling, two dense layers."""
  channels: Sequence[int] = (32, 64)
  widths: Sequence[int] = (256,)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for c in self.channels:
      x = nn.max_pool(nn.relu(nn.Conv(c, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    for w in self.widths:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
  channels: int
  hidden: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(self.hidden, (3, 3), padding="SAME", use_bias=False)(x)
    y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
    y = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train)(y)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small ResNet-style CNN with BatchNorm and residual adds: stem, stages of blocks, pooling, dense head.

  `stage_channels[i]` is the residual stream width of stage i (shared by every block in it);
  `hidden[i][j]` is the inner width of block j of stage i.
  """
  stage_channels: Sequence[int] = (16, 32)
  hidden: Sequence[Sequence[int]] = ((16, 16), (32, 32))
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, c in enumerate(self.stage_channels):
      x = nn.Conv(c, (3, 3), strides=(1, 1) if i == 0 else (2, 2), padding="SAME", use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      for h in self.hidden[i]:
        x = ResidualBlock(c, h)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


MODELS = {"lenet300": LeNet300, "lenet5": LeNet5, "resnet": ResNet, "simplecnn": SimpleCNN}


def create(name: str, **kwargs) -> nn.Module:
  """Builds a reference model by name (lenet300, lenet5, resnet, simplecnn)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}.")
  return MODELS[name](**kwargs)
