"""The byte-level BPE tokenizer of a GGUF file, built with the `tokenizers` library."""

from __future__ import annotations


class Tokenizer:
  """Byte-level BPE from a GGUF's vocab and merges (the `tokenizers` library does the work)."""

  def __init__(self, tokens, merges, token_types=None, bos_id=None, eos_id=None, digits_split=True):
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = _Tok(models.BPE(vocab=vocab, merges=pairs))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if digits_split:  # llama.cpp's "smollm" pre-tokenizer: every digit on its own, then GPT-2's regex
      pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    if token_types is not None:
      special = [tokens[i] for i, ty in enumerate(token_types) if int(ty) == 3]  # CONTROL tokens
      tok.add_special_tokens(special)
    self._tok = tok
    self.tokens, self.merges = list(tokens), list(merges)
    self.token_types = None if token_types is None else [int(t) for t in token_types]
    self.gguf_metadata = None    # set by load_gguf: the file's tokenizer.* fields, written back by save_gguf
    self.vocab_size = len(tokens)
    self.bos_id, self.eos_id = bos_id, eos_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token(self, i: int) -> str:
    return self._tok.id_to_token(int(i))
