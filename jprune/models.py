"""Reference Flax models. Widths are constructor arguments, so a compacted model can be rebuilt."""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
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


class TransformerBlock(nn.Module):
  """A pre-norm transformer block (multi-head self-attention + MLP) on (batch, seq, dim) inputs."""
  num_heads: int = 4
  head_dim: int = 8
  mlp: int = 64
  v_head_dim: Optional[int] = None  # value/output head width (compaction can shrink it apart from q/k)

  @nn.compact
  def __call__(self, x, train: bool = False):
    dim = x.shape[-1]
    h = nn.LayerNorm()(x)
    q = nn.DenseGeneral((self.num_heads, self.head_dim), name="query")(h)
    k = nn.DenseGeneral((self.num_heads, self.head_dim), name="key")(h)
    v = nn.DenseGeneral((self.num_heads, self.v_head_dim or self.head_dim), name="value")(h)
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(k.shape[-1])), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
    x = x + nn.DenseGeneral(dim, axis=(-2, -1), name="out")(o)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(dim, name="mlp_out")(nn.gelu(nn.Dense(self.mlp, name="mlp_in")(h)))


def resize(model: nn.Module, params) -> nn.Module:
  """Rebuilds a reference model with the widths found in (compacted) `params`."""
  def width(path, axis=-1):
    p = params
    for k in path.split("/"):
      p = p[k]
    return int(p.shape[axis])

  if isinstance(model, LeNet300):
    return model.clone(widths=tuple(width(f"Dense_{i}/kernel") for i in range(len(model.widths))))
  if isinstance(model, (LeNet5, SimpleCNN)):
    return model.clone(channels=tuple(width(f"Conv_{i}/kernel") for i in range(len(model.channels))),
                       widths=tuple(width(f"Dense_{i}/kernel") for i in range(len(model.widths))))
  if isinstance(model, ResNet):
    blocks, hidden = 0, []
    for i, stage in enumerate(model.hidden):
      hidden.append(tuple(width(f"ResidualBlock_{blocks + j}/Conv_0/kernel") for j in range(len(stage))))
      blocks += len(stage)
    return model.clone(stage_channels=tuple(width(f"Conv_{i}/kernel") for i in range(len(model.stage_channels))),
                       hidden=tuple(hidden))
  if isinstance(model, TransformerBlock):
    return model.clone(num_heads=width("query/kernel", 1), head_dim=width("query/kernel", 2),
                       v_head_dim=width("value/kernel", 2), mlp=width("mlp_in/kernel"))
  raise ValueError(f"resize does not know {type(model).__name__}; rebuild it from the compacted shapes.")
