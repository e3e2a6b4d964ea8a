"""The OpenAI API's request and response objects, as far as this server speaks it.

Requests are pydantic models (unknown fields are ignored, as OpenAI's clients send some that do
not apply, but the known ones this server does not implement are refused: `UNSUPPORTED`); responses and stream chunks are the dicts the API documents, so the `openai` client
parses them. Every error is `error_body`'s shape with the offending field in `param`. The
scheduling lives in `server.py`; this module knows nothing of models or rows.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict[str, Any]:
  """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestError(ValueError):
  """A request the server cannot serve: an HTTP status, the field at fault, one line."""

  def __init__(self, message: str, param: str | None = None, status: int = 400,
               code: str | None = None):
    super().__init__(message)
    self.param, self.status, self.code = param, status, code

  def body(self) -> dict[str, Any]:
    return error_body(str(self), self.param, self.code)


def validation_error(e: pydantic.ValidationError | Any) -> RequestError:
  """The first problem of a pydantic (or FastAPI) validation error, as a RequestError."""
  first = e.errors()[0]
  loc = [str(p) for p in first.get("loc", ()) if p != "body"]
  if first.get("type") == "json_invalid":
    return RequestError(f"the body is not valid JSON: {first.get('msg', '')}".rstrip(": "))
  param = ".".join(loc) or None
  value = first.get("input")
  shown = "" if param is None or isinstance(value, dict) else f"={value!r:.60}"
  return RequestError(f"{param or 'body'}{shown}: {first.get('msg', 'invalid')}", param)


# OpenAI fields this server does not implement; a request that sets one is refused.
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
               "best_of", "echo", "suffix", "tools", "functions", "response_format")


class StreamOptions(BaseModel):
  include_usage: bool = False


class Sampling(BaseModel):
  """The fields both endpoints share. skip_ratio (not OpenAI's): the speedup ratio of the plan
  that decodes the request (1 = full depth), or "lossless" for self-speculative decoding; the
  same choice as a model name's "@2x" / "@lossless" suffix."""
  model_config = ConfigDict(extra="ignore")
  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0, le=2)  # None: 1, or 0 for the lossless plan
  top_p: float = Field(1.0, gt=0, le=1)
  stop: str | list[str] | None = None
  seed: int | None = None
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None
  skip_ratio: float | Literal["lossless"] | None = None

  @pydantic.model_validator(mode="before")
  @classmethod
  def _supported(cls, data):
    """Fields that would change the answer if honoured are refused rather than ignored."""
    if isinstance(data, dict):
      for name in UNSUPPORTED:
        if data.get(name) not in (None, False, 0, [], {}, "none", "auto"):
          raise pydantic.ValidationError.from_exception_data(cls.__name__, [dict(
              type="value_error", loc=(name,), input=data[name],
              ctx=dict(error=f"{name} is not supported by this server"))])
    return data

  @pydantic.field_validator("n")
  @classmethod
  def _one_choice(cls, n: int) -> int:
    if n != 1:
      raise ValueError("only n=1 is supported (one choice per request)")
    return n

  @pydantic.field_validator("stop")
  @classmethod
  def _stops(cls, stop):
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > 4 or any(not s for s in stops):
      raise ValueError("give at most 4 non-empty stop strings")
    return stops

  @pydantic.field_validator("skip_ratio")
  @classmethod
  def _ratio(cls, r):
    if isinstance(r, float) and r < 1:
      raise ValueError("a skip ratio is a speedup >= 1 (1 = full depth), or 'lossless'")
    return r

  @property
  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampling):
  prompt: str | list[int] | list[str]

  @pydantic.field_validator("prompt")
  @classmethod
  def _one_prompt(cls, prompt):
    if isinstance(prompt, list) and not prompt:
      raise ValueError("the prompt is empty")
    if isinstance(prompt, list) and isinstance(prompt[0], str):
      if len(prompt) != 1:
        raise ValueError("give one prompt per request (a string or a list of token ids)")
      return prompt[0]
    return prompt


class ContentPart(BaseModel):
  model_config = ConfigDict(extra="ignore")
  type: Literal["text"]
  text: str


class Message(BaseModel):
  model_config = ConfigDict(extra="ignore")
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: str | list[ContentPart]

  def text(self) -> str:
    return self.content if isinstance(self.content, str) else "".join(
        p.text for p in self.content)


class ChatRequest(Sampling):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
              total_tokens=prompt_tokens + completion_tokens)


def completion(rid: str, model: str, text: str, finish_reason: str | None,
               use: dict | None) -> dict[str, Any]:
  """A text completion, or (stream) one chunk of it: the same object either way."""
  return dict(id=rid, object="text_completion", created=int(time.time()), model=model,
              choices=[dict(index=0, text=text, logprobs=None, finish_reason=finish_reason)],
              usage=use)


def chat_completion(rid: str, model: str, text: str, finish_reason: str,
                    use: dict) -> dict[str, Any]:
  return dict(id=rid, object="chat.completion", created=int(time.time()), model=model,
              choices=[dict(index=0, message=dict(role="assistant", content=text),
                            logprobs=None, finish_reason=finish_reason)], usage=use)


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None,
               use: dict | None = None, choices: bool = True) -> dict[str, Any]:
  """A chat stream chunk; choices=False: the final usage-only chunk (stream_options)."""
  return dict(id=rid, object="chat.completion.chunk", created=int(time.time()), model=model,
              choices=[dict(index=0, delta=delta, logprobs=None, finish_reason=finish_reason)]
              if choices else [], usage=use)


def models_list(names: list[str], owner: str = "ulskip_jax") -> dict[str, Any]:
  created = int(time.time())
  return dict(object="list", data=[dict(id=n, object="model", created=created, owned_by=owner)
                                   for n in names])
