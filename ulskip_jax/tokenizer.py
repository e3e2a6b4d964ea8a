"""The tokenizer: a Hugging Face tokenizer (a base model's, or a byte-level BPE trained on the
corpus) with plain id lists and explicit special ids."""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import tokenizers
import transformers


class Tokenizer:
  """A thin wrapper over a Hugging Face tokenizer: plain id lists, explicit special ids.

  `encode` never adds special tokens: encode_example places bos / eos itself, so the same
  code serves tokenizers with and without a bos token.
  """

  def __init__(self, hf_tokenizer: Any, chat: bool = False):
    if hf_tokenizer.eos_token_id is None:
      raise ValueError(f'tokenizer {type(hf_tokenizer).__name__} has no eos token; one is needed')
    self._hf = hf_tokenizer
    self.eos_id: int = hf_tokenizer.eos_token_id
    # Many causal LMs ship without a pad token; pad positions are masked out, so eos serves.
    self.pad_id: int = (
        hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id
    )
    self.bos_id: int | None = hf_tokenizer.bos_token_id
    self.vocab_size: int = len(hf_tokenizer)
    self.chat = False
    self._chat_frame = None
    self.set_chat(chat)

  @property
  def hf(self) -> Any:
    """The wrapped Hugging Face tokenizer (e.g. for `hf.save_pretrained(..., tokenizer=)`)."""
    return self._hf

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self._hf, 'chat_template', None))

  def set_chat(self, chat: bool) -> None:
    """Chat format on or off: prompts become the user turn of the tokenizer's chat template."""
    if chat and not self.has_chat_template:
      raise ValueError('chat=True but the tokenizer has no chat template: turn chat off '
                       '(data.chat=False, infer.py --no-chat)')
    self.chat = bool(chat)

  def prompt_template(self, template: str) -> str:
    """The template of a whole prompt's text: `template` itself, or in chat format the user
    turn holding it followed by the opening of the assistant's turn (the model answers there)."""
    if not self.chat:
      return template
    marker = '\0'
    if self._chat_frame is None:  # rendering the Jinja template is slow; it never changes
      self._chat_frame = self._hf.apply_chat_template(
          [{'role': 'user', 'content': marker}], tokenize=False, add_generation_prompt=True)
    rendered = self._chat_frame
    head, tail = rendered.split(marker)
    escape = lambda text: text.replace('{', '{{').replace('}', '}}')
    return escape(head) + template + escape(tail)

  @property
  def prefix_ids(self) -> list[int]:
    """Ids before a prompt's text: [bos] (none in chat format, whose markup opens the text)."""
    return [self.bos_id] if self.bos_id is not None and not self.chat else []

  def target_text(self, target: str) -> str:
    """A response as trained: " " + text after a plain prompt, the text alone after the chat
    markup, which ends in a newline; the end of response is always the eos token."""
    return target if self.chat else ' ' + target

  def prompt_ids(self, text: str) -> list[int]:
    """Ids of a prompt whose text (the template already applied) is `text`, as in training."""
    return self.prefix_ids + self.encode(self.prompt_template('{source}').format(source=text))

  @classmethod
  def from_pretrained(cls, folder: str, chat: bool = False) -> Tokenizer:
    """Loads a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json, ...)."""
    if not os.path.isdir(folder):
      raise ValueError(f'tokenizer folder {folder!r} does not exist; a local folder is needed')
    return cls(transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True), chat)

  @classmethod
  def load(cls, directory: str, chat: bool = False) -> Tokenizer:
    """Loads what `save` wrote; trained BPE and pretrained tokenizers save the same format."""
    return cls.from_pretrained(directory, chat)

  @classmethod
  def train_bpe(
      cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2
  ) -> Tokenizer:
    """Byte-level BPE trained on `texts`, with <pad>=0, <bos>=1, <eos>=2.

    Byte-level pre-tokenization without a prefix space makes decode(encode(text)) == text
    for any string, so BLEU is computed on exactly the text the model produced.
    """
    special_tokens = ['<pad>', '<bos>', '<eos>']
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars print blank lines when stdout is not a terminal
    )
    bpe.train_from_iterator(texts, trainer)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token='<pad>',
        bos_token='<bos>',
        eos_token='<eos>',
        # The default clean-up rewrites " ." to "." and would break the round trip.
        clean_up_tokenization_spaces=False,
    )
    return cls(hf_tokenizer)

  def save(self, directory: str) -> None:
    """Writes a Hugging Face folder that AutoTokenizer and Tokenizer.load both read."""
    self._hf.save_pretrained(directory)

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """encode over many texts at once (the Rust tokenizer runs them in parallel)."""
    if not texts:
      return []
    # The Rust tokenizer directly: transformers' __call__ adds Python work per text that costs
    # more than the tokenization itself, for the same ids.
    backend = getattr(self._hf, 'backend_tokenizer', None)
    if backend is not None:
      return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return self._hf(list(texts), add_special_tokens=False)['input_ids']

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` with special tokens (bos, eos, pad) dropped."""
    return self._hf.decode(list(ids), skip_special_tokens=True)
