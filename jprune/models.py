"""Reference Flax models. Widths are constructor arguments, so a compacted model can be rebuilt."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jprune import _spec


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
  """Builds a reference model by name (lenet300, lenet5, resnet, simplecnn), or yours as "package.module:factory".

  A factory is any callable returning a linen Module called as `model(x, train=bool)` that returns logits (BatchNorm
  statistics, if any, in the "batch_stats" collection); it gets those of `kwargs` it accepts by name (e.g.
  `num_classes`). The module is imported from the current folder or the Python path.
  """
  if ":" in name:
    return _user_model(name, kwargs)
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}, or give your own as "
                     f"package.module:factory.")
  return MODELS[name](**kwargs)


def code_digest(spec: str) -> Optional[str]:
  """sha256 of the source file that defines "package.module:…" (None for a reference model's name): part of a
  run's identity, so an edited model is trained anew instead of answered from an older checkpoint."""
  if ":" not in spec:
    return None
  import hashlib
  import inspect
  import sys
  _spec.load_object(spec, "--model")
  mod = sys.modules[spec.partition(":")[0]]
  path = inspect.getsourcefile(mod)
  data = open(path, "rb").read() if path else repr(mod).encode()
  return hashlib.sha256(data).hexdigest()


def _user_model(spec: str, kwargs) -> nn.Module:
  import inspect
  factory = _spec.load_object(spec, "--model")
  if not callable(factory):
    raise ValueError(f"--model {spec!r}: {type(factory).__name__} is not callable; expected a factory returning "
                     f"a linen Module.")
  try:
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in kwargs.items() if takes_all or k in params}
  except (TypeError, ValueError):   # no signature (a builtin): call it bare
    given = {}
  model = factory(**given)
  if not isinstance(model, nn.Module):
    raise ValueError(f"--model {spec!r}: the factory returned {type(model).__name__}, expected a flax.linen Module.")
  call = inspect.signature(type(model).__call__).parameters
  if "train" not in call and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in call.values()):
    raise ValueError(f"--model {spec!r}: {type(model).__name__}.__call__ takes no `train` argument; jprune calls "
                     f"model(x, train=True) to train and model(x, train=False) to evaluate.")
  return model


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


def resize(model: nn.Module, params) -> Any:
  """A model that runs on (compacted) `params`: jprune's reference models are rebuilt with those widths; any other
  linen model comes back wrapped by `jprune.resize.resized` (its layers take the widths of their params)."""
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
  from jprune.resize import resized   # any other linen model: cloned layer by layer at call time
  return resized(model)


# ----------------------------------------------------------------------------------------------- Llama
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes of a Llama-architecture decoder (GQA, RoPE, RMSNorm, SwiGLU; tied or untied embeddings).

  A compacted model has per-layer widths: `layer_hidden_dims[i]` (SwiGLU width of block i),
  `layer_n_heads[i]` and `layer_n_kv_heads[i]` (query and key/value heads of block i); `None` means every
  block has the base width. The head width `d_head` stays the base one.
  """
  vocab_size: int = 49152
  dim: int = 576
  n_layers: int = 30
  n_heads: int = 9
  n_kv_heads: int = 3
  hidden_dim: int = 1536
  head_dim: Optional[int] = None     # default: dim // n_heads
  rope_theta: float = 100000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_seq_len: int = 8192
  layer_hidden_dims: Optional[tuple] = None
  layer_n_heads: Optional[tuple] = None
  layer_n_kv_heads: Optional[tuple] = None

  def __post_init__(self):
    for name in ("layer_hidden_dims", "layer_n_heads", "layer_n_kv_heads"):
      v = getattr(self, name)
      if v is not None:
        object.__setattr__(self, name, tuple(int(x) for x in v))
        if len(getattr(self, name)) != self.n_layers:
          raise ValueError(f"{name} has {len(v)} entries for n_layers={self.n_layers}.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}.")
    if self.head_dim is None and self.dim % self.n_heads:
      raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}; give head_dim.")
    for i in range(self.n_layers):
      h, kv, f = self.heads_of(i), self.kv_heads_of(i), self.hidden_of(i)
      if h < 1 or kv < 1 or h % kv:
        raise ValueError(f"block {i}: {h} query heads over {kv} KV heads; need kv >= 1 and heads a multiple of kv.")
      if f < 1:
        raise ValueError(f"block {i}: SwiGLU width {f}; need at least 1.")

  @property
  def d_head(self) -> int:
    return self.head_dim or self.dim // self.n_heads

  def hidden_of(self, i: int) -> int:
    return self.hidden_dim if self.layer_hidden_dims is None else self.layer_hidden_dims[i]

  def heads_of(self, i: int) -> int:
    return self.n_heads if self.layer_n_heads is None else self.layer_n_heads[i]

  def kv_heads_of(self, i: int) -> int:
    return self.n_kv_heads if self.layer_n_kv_heads is None else self.layer_n_kv_heads[i]

  @property
  def uniform(self) -> bool:
    """Whether every block has the same widths (llama.cpp's `llama` architecture can hold it)."""
    return all((self.hidden_of(i), self.heads_of(i), self.kv_heads_of(i)) ==
               (self.hidden_of(0), self.heads_of(0), self.kv_heads_of(0)) for i in range(self.n_layers))

  def layer(self, i: int) -> "LlamaConfig":
    """The config of block i alone as a uniform config (same `d_head`): blocks of equal widths share it."""
    return dataclasses.replace(self, n_heads=self.heads_of(i), n_kv_heads=self.kv_heads_of(i),
                               hidden_dim=self.hidden_of(i), head_dim=self.d_head, layer_hidden_dims=None,
                               layer_n_heads=None, layer_n_kv_heads=None)

  def with_widths(self, hidden=None, heads=None, kv_heads=None, n_layers=None) -> "LlamaConfig":
    """A config with per-layer widths (sequences of length n_layers); uniform ones collapse to the base fields."""
    n = self.n_layers if n_layers is None else n_layers
    hidden = [self.hidden_of(i) for i in range(n)] if hidden is None else list(hidden)
    heads = [self.heads_of(i) for i in range(n)] if heads is None else list(heads)
    kv_heads = [self.kv_heads_of(i) for i in range(n)] if kv_heads is None else list(kv_heads)
    uni = lambda v: len(set(v)) == 1
    return dataclasses.replace(
        self, n_layers=n, head_dim=self.d_head,
        hidden_dim=hidden[0] if uni(hidden) else self.hidden_dim,
        n_heads=heads[0] if uni(heads) and uni(kv_heads) else self.n_heads,
        n_kv_heads=kv_heads[0] if uni(heads) and uni(kv_heads) else self.n_kv_heads,
        layer_hidden_dims=None if uni(hidden) else tuple(hidden),
        layer_n_heads=None if uni(heads) and uni(kv_heads) else tuple(heads),
        layer_n_kv_heads=None if uni(heads) and uni(kv_heads) else tuple(kv_heads))

  def block_params(self, i: int) -> int:
    """Parameters of block i (its 7 kernels and 2 norm scales)."""
    d, dh = self.dim, self.d_head
    return d * dh * (2 * self.heads_of(i) + 2 * self.kv_heads_of(i)) + 3 * d * self.hidden_of(i) + 2 * d

  def macs_per_token(self, context: int = 0) -> int:
    """Multiply-accumulates per token of a forward pass: every kernel (and the LM head), plus attention's
    q·k and p·v over `context` earlier positions."""
    attn = sum(2 * context * self.heads_of(i) * self.d_head for i in range(self.n_layers))
    kernels = sum(self.block_params(i) - 2 * self.dim for i in range(self.n_layers))
    return kernels + self.vocab_size * self.dim + attn

  @classmethod
  def smollm2_135m(cls) -> "LlamaConfig":
    """SmolLM2-135M: 30 blocks, d=576, 9 query / 3 KV heads, SwiGLU 1536, RoPE base 1e5, tied embeddings."""
    return cls()

  @classmethod
  def llama_1b(cls) -> "LlamaConfig":
    """Llama-3.2-1B shapes: 16 blocks, d=2048, 32 / 8 heads, SwiGLU 8192, vocab 128256 (1.24B params)."""
    return cls(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
               rope_theta=500000.0)

  @classmethod
  def llama2_7b(cls) -> "LlamaConfig":
    """Llama-2-7B shapes: 32 blocks, d=4096, 32 heads (no GQA), SwiGLU 11008, vocab 32000, untied (6.74B params)."""
    return cls(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
               rope_theta=10000.0, tie_embeddings=False, max_seq_len=4096)

  @classmethod
  def tiny(cls, **kw) -> "LlamaConfig":
    """A few-thousand-parameter config for tests."""
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, rope_theta=10000.0,
                max_seq_len=128)
    return cls(**{**base, **kw})


def _at_least_f32(dtype):
  """float32 for half types, the dtype itself for float32/float64 (so an x64 run computes in float64)."""
  return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


class RMSNorm(nn.Module):
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(_at_least_f32(x.dtype))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.reshape((1,) * (y.ndim - 1) + (-1,))).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of (batch, seq, heads, head_dim), in the rotate-half layout of HF's Llama."""
  d, f = x.shape[-1], _at_least_f32(x.dtype)
  inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=f) / d))
  ang = positions.astype(f)[:, None] * inv[None, :]                   # (seq, d/2)
  cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None, :]
  sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None, :]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(f) * cos + rotated.astype(f) * sin).astype(x.dtype)


class LlamaAttention(nn.Module):
  """Grouped-query causal self-attention with RoPE. `mix` returns the heads' output before `o_proj`.

  `layer` picks block `layer`'s head counts from a config with per-layer widths.
  """
  config: LlamaConfig
  layer: int = 0

  def setup(self):
    c = self.config.layer(self.layer)
    dh = c.d_head
    self.q_proj = nn.Dense(c.n_heads * dh, use_bias=False)
    self.k_proj = nn.Dense(c.n_kv_heads * dh, use_bias=False)
    self.v_proj = nn.Dense(c.n_kv_heads * dh, use_bias=False)
    self.o_proj = nn.Dense(c.dim, use_bias=False)

  def mix(self, x, positions):
    c = self.config.layer(self.layer)
    b, t, _ = x.shape
    dh, kv, g = c.d_head, c.n_kv_heads, c.n_heads // c.n_kv_heads
    q = self.q_proj(x).reshape(b, t, c.n_heads, dh)
    k = self.k_proj(x).reshape(b, t, kv, dh)
    v = self.v_proj(x).reshape(b, t, kv, dh)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    q = q.reshape(b, t, kv, g, dh)
    f = _at_least_f32(q.dtype)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(f) / jnp.sqrt(jnp.asarray(dh, f))
    causal = positions[:, None] >= positions[None, :]
    s = jnp.where(causal[None, None, None], s, jnp.asarray(-1e30, f))
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, c.n_heads * dh)

  def __call__(self, x, positions):
    return self.o_proj(self.mix(x, positions))


class LlamaMLP(nn.Module):
  """SwiGLU MLP. `hidden` returns silu(gate(x))·up(x), the input of `down_proj`."""
  config: LlamaConfig
  layer: int = 0

  def setup(self):
    c = self.config.layer(self.layer)
    self.gate_proj = nn.Dense(c.hidden_dim, use_bias=False)
    self.up_proj = nn.Dense(c.hidden_dim, use_bias=False)
    self.down_proj = nn.Dense(c.dim, use_bias=False)

  def hidden(self, x):
    return nn.silu(self.gate_proj(x)) * self.up_proj(x)

  def __call__(self, x):
    return self.down_proj(self.hidden(x))


class LlamaBlock(nn.Module):
  """One pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h))."""
  config: LlamaConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x, positions):
    c = self.config.layer(self.layer)
    h = x + LlamaAttention(c, name="attn")(RMSNorm(c.norm_eps, name="attn_norm")(x), positions)
    return h + LlamaMLP(c, name="mlp")(RMSNorm(c.norm_eps, name="mlp_norm")(h))


class Llama(nn.Module):
  """A Llama-architecture decoder: tokens (batch, seq) int32 -> logits (batch, seq, vocab).

  Params: `embed/embedding`, `layers_{i}/{attn,mlp}/*_proj/kernel` (in, out), `layers_{i}/*_norm/scale`,
  `norm/scale`, and `lm_head/kernel` when embeddings are untied. `remat=True` recomputes each block in the
  backward pass (memory of one block's activations for gradients).
  """
  config: LlamaConfig = LlamaConfig()
  remat: bool = False

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.dim, embedding_init=nn.initializers.normal(0.02))
    block = nn.remat(LlamaBlock) if self.remat else LlamaBlock
    self.layers = [block(c, i, name=f"layers_{i}") for i in range(c.n_layers)]
    self.norm = RMSNorm(c.norm_eps)
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False)

  def __call__(self, tokens, train: bool = False):
    positions = jnp.arange(tokens.shape[1])
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x, positions)
    return self.head(x)

  def head(self, x):
    x = self.norm(x)
    if self.config.tie_embeddings:
      return self.embed.attend(x)
    return self.lm_head(x)
