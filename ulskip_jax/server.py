"""An OpenAI-compatible HTTP server over `slots.SlotPool`s: one pool (rows, cache, executables)
per plan, all sharing one copy of the weights, and one host thread that schedules them.

`serve` (what serve.py calls) builds and warms up every pool before it listens, so no request
ever waits for a compile. The scheduler (`Scheduler`, a thread: JAX calls block) loops: take new
requests, free the rows of cancelled ones, start waiting requests in free rows (prefill first:
a request's first token is its own prefill away), then run one `decode_steps` call of each pool
with live rows and hand the new tokens to their requests' asyncio queues. The HTTP side
(FastAPI) tokenizes, picks the plan from the model name ("NAME", "NAME@2x", "NAME@lossless")
or the `skip_ratio` field, detokenizes incrementally and applies stop strings; a client that disconnects (or a
stop string) cancels its request, whose row the scheduler frees before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import fastapi
import prometheus_client as prom
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ulskip_jax import decode, protocol, slots
from ulskip_jax import speculative as speculative_lib
from ulskip_jax.protocol import RequestError
from ulskip_jax.skipping import SkipPlan

log = logging.getLogger("ulskip_jax.server")


LOSSLESS = "lossless"


def plan_name(model_name: str, ratio: float | str) -> str:
  """'smollm2' at full depth, 'smollm2@2x' at ratio 2, 'smollm2@lossless'."""
  if ratio == LOSSLESS:
    return f"{model_name}@{LOSSLESS}"
  return model_name if ratio == 1 else f"{model_name}@{ratio:g}x"


@dataclasses.dataclass
class Request:
  """One request's way through the scheduler; `events` receives ("tokens", [ids]) and then
  ("done", finish_reason) or ("error", message), on the server's event loop."""
  plan: str
  prompt: list[int]
  max_new: int
  temperature: float
  top_p: float
  seed: int
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue
  arrived: float = dataclasses.field(default_factory=time.perf_counter)
  cancelled: bool = False
  generated: int = 0

  def send(self, *event) -> None:
    self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Metrics:
  """The Prometheus series, in their own registry (one per server)."""

  def __init__(self, plans: list[str]):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.queued = prom.Gauge("ulskip_queue_length", "requests waiting for a row", ["plan"],
                             registry=r)
    self.running = prom.Gauge("ulskip_running_rows", "rows decoding a request", ["plan"],
                              registry=r)
    self.tokens = prom.Counter("ulskip_generated_tokens", "tokens generated", ["plan"],
                               registry=r)
    self.prompt_tokens = prom.Counter("ulskip_prompt_tokens", "prompt tokens prefilled", ["plan"],
                                      registry=r)
    self.requests = prom.Counter("ulskip_requests_finished", "requests finished",
                                 ["plan", "reason"], registry=r)
    self.tokens_per_s = prom.Gauge("ulskip_tokens_per_second",
                                   "generated tokens per second over the last 10 s", registry=r)
    self.ttft = prom.Histogram("ulskip_time_to_first_token_seconds",
                               "arrival to first token", ["plan"], registry=r,
                               buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
    for p in plans:
      for series in (self.queued, self.running, self.tokens, self.prompt_tokens, self.ttft):
        series.labels(p)
    self._recent: deque[tuple[float, int]] = deque()

  def generated(self, plan: str, n: int) -> None:
    self.tokens.labels(plan).inc(n)
    now = time.perf_counter()
    self._recent.append((now, n))
    while self._recent and self._recent[0][0] < now - 10:
      self._recent.popleft()
    span = now - self._recent[0][0] if len(self._recent) > 1 else 0
    self.tokens_per_s.set(sum(k for _, k in self._recent) / span if span else 0)


class Scheduler:
  """The host loop over the pools, on its own thread."""

  def __init__(self, pools: dict[str, slots.SlotPool], metrics: Metrics, eos_id: int | None):
    self.pools, self.metrics, self.eos_id = pools, metrics, eos_id
    self.waiting = {p: deque() for p in pools}
    self.rows: dict[str, dict[int, Request]] = {p: {} for p in pools}
    self._incoming: list[Request] = []
    self._wake = threading.Condition()
    self._closing = False
    self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def submit(self, request: Request) -> None:
    with self._wake:
      self._incoming.append(request)
      self._wake.notify()

  def poke(self) -> None:
    """Wakes the loop (a request was cancelled)."""
    with self._wake:
      self._wake.notify()

  def close(self) -> None:
    """Cancels what is left and stops the thread."""
    with self._wake:
      self._closing = True
      self._wake.notify()
    self._thread.join(timeout=60)

  def _busy(self) -> bool:
    return any(self.rows.values()) or any(self.waiting.values())

  def _run(self) -> None:
    while True:
      with self._wake:
        while not (self._incoming or self._busy() or self._closing):
          self._wake.wait()
        incoming, self._incoming = self._incoming, []
        closing = self._closing
      for r in incoming:
        self.waiting[r.plan].append(r)
      if closing:
        for plan in self.pools:
          for r in list(self.waiting[plan]) + list(self.rows[plan].values()):
            r.send("error", "the server is shutting down")
        return
      try:
        self._tick()
      except Exception as e:  # pylint: disable=broad-except
        log.exception("scheduler step failed")
        for plan in self.pools:  # fail what is in flight, keep serving
          for r in list(self.waiting[plan]) + list(self.rows[plan].values()):
            r.send("error", f"internal error: {type(e).__name__}: {e}")
          self.waiting[plan].clear()
          for row in list(self.rows[plan]):
            self.pools[plan].stop(row)
          self.rows[plan].clear()

  def _tick(self) -> None:
    for plan, pool in self.pools.items():
      rows, waiting = self.rows[plan], self.waiting[plan]
      for row, r in list(rows.items()):
        if r.cancelled:
          pool.stop(row)
          del rows[row]
          self.metrics.requests.labels(plan, "cancelled").inc()
      for r in [r for r in waiting if r.cancelled]:
        waiting.remove(r)
        self.metrics.requests.labels(plan, "cancelled").inc()
      for row in range(pool.rows):
        if row in rows or not waiting:
          continue
        r = waiting.popleft()
        tok = pool.start(row, r.prompt, max_new=r.max_new, temperature=r.temperature,
                         top_p=r.top_p, seed=r.seed)
        self.metrics.ttft.labels(plan).observe(time.perf_counter() - r.arrived)
        self.metrics.prompt_tokens.labels(plan).inc(len(r.prompt))
        rows[row] = r
        self._emit(plan, row, r, [tok], done=tok == self.eos_id or r.max_new <= 1)
    for plan, pool in self.pools.items():
      rows = self.rows[plan]
      if rows:
        tokens, emitted, done = pool.step()
        for row, r in list(rows.items()):
          self._emit(plan, row, r, tokens[row][emitted[row]].tolist(), done=bool(done[row]))
      self.metrics.queued.labels(plan).set(len(self.waiting[plan]))
      self.metrics.running.labels(plan).set(len(rows))

  def _emit(self, plan: str, row: int, r: Request, tokens: list[int], done: bool) -> None:
    r.generated += len(tokens)
    self.metrics.generated(plan, len(tokens))
    eos = self.eos_id is not None and self.eos_id in tokens
    tokens = tokens[:tokens.index(self.eos_id)] if eos else tokens
    if tokens:
      r.send("tokens", tokens)
    if done:
      del self.rows[plan][row]
      reason = "stop" if eos else "length"
      self.metrics.requests.labels(plan, reason).inc()
      r.send("done", reason)


class TextStream:
  """Incremental detokenization with stop strings: `add(ids)` returns the new text that is
  safe to send (no half character, nothing that may become a stop string) and whether a stop
  string ended the text; `rest()` the held-back text at the end."""

  def __init__(self, tokenizer, stops: list[str] | None):
    self.tokenizer, self.stops = tokenizer, stops or []
    self.ids: list[int] = []
    self.sent = 0      # characters of the text sent so far
    self.text = ""

  def add(self, ids: list[int]) -> tuple[str, bool]:
    self.ids += ids
    self.text = decode.decode_ids(self.tokenizer, self.ids)
    hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops)
            if i >= 0]
    if hits:
      self.text = self.text[:min(hits)]
      return self._take(len(self.text)), True
    end = len(self.text)
    if self.text.endswith("\ufffd"):  # a character whose bytes have not all arrived
      end -= 1
    for s in self.stops:  # hold back a tail that could still become a stop string
      for k in range(min(len(s) - 1, end - self.sent), 0, -1):
        if self.text[:end].endswith(s[:k]):
          end -= k
          break
    return self._take(max(end, self.sent)), False

  def rest(self) -> str:
    return self._take(len(self.text))

  def _take(self, end: int) -> str:
    piece, self.sent = self.text[self.sent:end], end
    return piece


@dataclasses.dataclass
class ServerState:
  """What the endpoints share."""
  model_name: str
  tokenizer: object
  pools: dict[str, slots.SlotPool]
  ratios: dict[float | str, str]  # skip_ratio -> plan name
  scheduler: Scheduler
  metrics: Metrics
  default_max_tokens: int


def resolve_plan(state: ServerState, body: protocol.Sampling) -> str:
  """The plan of the model name and skip_ratio (RequestError naming the field otherwise)."""
  names = list(state.pools)
  if body.model not in names:
    raise RequestError(f"model={body.model!r} does not exist: available are "
                       + ", ".join(names), "model", 404, "model_not_found")
  if body.skip_ratio is None:
    return body.model
  ratio = body.skip_ratio
  plan = state.ratios.get(ratio)
  if plan is None:
    raise RequestError(f"skip_ratio={ratio!r} is not served: available are "
                       + ", ".join(repr(r) if isinstance(r, str) else f"{r:g}"
                                   for r in state.ratios), "skip_ratio")
  if body.model != state.model_name and body.model != plan:
    raise RequestError(f"skip_ratio={ratio!r} contradicts model={body.model!r}: give one of "
                       "them", "skip_ratio")
  return plan


def check_ids(state: ServerState, ids: list[int], param: str) -> None:
  V = state.pools[next(iter(state.pools))].cfg.vocab_size
  bad = [i for i in ids if not 0 <= i < V]
  if bad:
    raise RequestError(f"{param} has token id {bad[0]}: ids must be in [0, {V})", param)


def make_request(state: ServerState, body: protocol.Sampling, prompt: list[int],
                 prompt_param: str, max_tokens: int | None) -> Request:
  plan = resolve_plan(state, body)
  pool = state.pools[plan]
  if not prompt:
    raise RequestError(f"{prompt_param} is empty: give at least one token", prompt_param)
  if len(prompt) > pool.num_slots:
    raise RequestError(f"{prompt_param} has {len(prompt)} tokens but this server holds at most "
                       f"{pool.num_slots} (prompt + max_tokens - 1)", prompt_param)
  max_new = max_tokens or min(state.default_max_tokens, pool.num_slots - len(prompt) + 1)
  try:
    pool.check_request(len(prompt), max_new)
  except ValueError as e:
    raise RequestError(str(e), "max_tokens") from None
  lossless = isinstance(pool, slots.SpeculativePool)
  temperature = body.temperature if body.temperature is not None else 0.0 if lossless else 1.0
  if lossless and temperature > 0:
    raise RequestError(f"temperature={temperature:g}: {plan} decodes greedily (the full model's "
                       "argmax); give temperature 0 or leave it out", "temperature")
  loop = asyncio.get_running_loop()
  return Request(plan=plan, prompt=prompt, max_new=max_new, temperature=temperature,
                 top_p=body.top_p, seed=random.getrandbits(32) if body.seed is None else body.seed,
                 loop=loop, events=asyncio.Queue())


async def run_request(state: ServerState, http: fastapi.Request, r: Request,
                      stops: list[str] | None) -> AsyncIterator[tuple[str, str | None]]:
  """(text piece, finish_reason or None) as the request decodes. Cancels the request when the
  client goes away, a stop string ends it, or the consumer stops iterating."""
  text = TextStream(state.tokenizer, stops)
  state.scheduler.submit(r)
  try:
    while True:
      try:
        kind, value = await asyncio.wait_for(r.events.get(), timeout=0.5)
      except asyncio.TimeoutError:
        if await http.is_disconnected():
          return
        continue
      if kind == "error":
        raise RequestError(value, None, 503 if "shutting down" in value else 500)
      if kind == "done":
        yield text.rest(), value
        return
      piece, stopped = text.add(value)
      if stopped:
        yield piece, "stop"
        return
      if piece:
        yield piece, None
  finally:
    r.cancelled = True  # a no-op for a request that finished
    state.scheduler.poke()


def sse(obj) -> str:
  return f"data: {json.dumps(obj)}\n\n"


def create_app(state: ServerState) -> fastapi.FastAPI:
  """The FastAPI app; the scheduler runs while the app's lifespan does."""

  @contextlib.asynccontextmanager
  async def lifespan(_):
    state.scheduler.start()
    yield
    state.scheduler.close()

  app = fastapi.FastAPI(title="ulskip_jax", lifespan=lifespan)

  @app.exception_handler(RequestError)
  async def request_error(_, e: RequestError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, e: RequestValidationError):
    e = protocol.validation_error(e)
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(fastapi.HTTPException)
  async def http_error(_, e: fastapi.HTTPException):
    return JSONResponse(protocol.error_body(str(e.detail)), status_code=e.status_code)

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics():
    return Response(prom.generate_latest(state.metrics.registry),
                    media_type=prom.CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def models():
    return protocol.models_list(list(state.pools))

  async def respond(http, body: protocol.Sampling, prompt: list[int], prompt_param: str,
                    max_tokens: int | None, chat: bool):
    r = make_request(state, body, prompt, prompt_param, max_tokens)
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    # Usage counts every token the model generated, the EOS that ended a request included.
    usage = lambda: protocol.usage(len(prompt), r.generated)
    if not body.stream:
      pieces, reason = [], "stop"
      async for piece, finish in run_request(state, http, r, body.stop):
        pieces.append(piece)
        reason = finish or reason
      text = "".join(pieces)
      if chat:
        return protocol.chat_completion(rid, body.model, text, reason, usage())
      return protocol.completion(rid, body.model, text, reason, usage())

    async def chunks():
      if chat:
        yield sse(protocol.chat_chunk(rid, body.model, dict(role="assistant", content=""), None))
      finish = None
      try:
        async for piece, finish in run_request(state, http, r, body.stop):
          if piece or finish:
            yield sse(protocol.chat_chunk(rid, body.model, dict(content=piece) if piece else {},
                                          finish) if chat else
                      protocol.completion(rid, body.model, piece, finish, None))
      except RequestError as e:  # the headers are sent: the error goes as an event
        yield sse(e.body())
        return
      if finish is None:  # the client went away
        return
      if body.include_usage:
        yield sse(protocol.chat_chunk(rid, body.model, {}, None, usage(), choices=False) if chat
                  else dict(protocol.completion(rid, body.model, "", None, usage()), choices=[]))
      yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")

  @app.post("/v1/completions")
  async def completions(http: fastapi.Request, body: protocol.CompletionRequest):
    if isinstance(body.prompt, str):
      prompt = decode.encode_prompt(state.tokenizer, body.prompt)
    else:
      prompt = list(body.prompt)
      check_ids(state, prompt, "prompt")
    return await respond(http, body, prompt, "prompt", body.max_tokens, chat=False)

  @app.post("/v1/chat/completions")
  async def chat(http: fastapi.Request, body: protocol.ChatRequest):
    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
      raise RequestError(f"model {state.model_name} has no chat template: use /v1/completions",
                         "messages")
    text = tok.apply_chat_template([dict(role=m.role, content=m.text()) for m in body.messages],
                                   tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    return await respond(http, body, prompt, "messages",
                         body.max_completion_tokens or body.max_tokens, chat=True)

  return app


def build_pools(model, tokenizer, *, model_name: str, plans: dict[float, tuple[Any, SkipPlan]],
                speculative: dict | None, rows: int, num_slots: int,
                steps: int) -> tuple[dict[str, slots.SlotPool], dict]:
  """A pool per ratio of `plans` (ratio -> (the model it decodes with, its plan): `model`'s
  weights, or an adapters-per-ratio workdir's sub-model) and one for `speculative` (draft options
  as `generate`'s; the shared draft cache only) on `model`, named by `plan_name`; and
  skip_ratio -> name."""
  eos_id, pad_id = decode.special_ids(tokenizer)
  common = dict(rows=rows, num_slots=num_slots, eos_id=eos_id, pad_id=pad_id, steps=steps)
  pools, names = {}, {}
  for ratio, (ratio_model, plan) in plans.items():
    names[float(ratio)] = plan_name(model_name, ratio)
    pools[names[float(ratio)]] = slots.SlotPool(ratio_model, skip=plan, **common)
  if speculative is not None:
    draft = speculative_lib.check(model.cfg, speculative)
    if not draft["shared_cache"]:
      raise ValueError("speculative draft_cache='separate' is not served: the lossless plan "
                       "drafts in the shared cache (draft_cache=shared)")
    names[LOSSLESS] = plan_name(model_name, LOSSLESS)
    pools[names[LOSSLESS]] = slots.SpeculativePool(
        model, draft_skip=draft["draft"], num_draft_tokens=draft["num_draft_tokens"],
        **common)
  return pools, names


def serve(model, tokenizer, *, model_name: str, plans: dict[float, tuple[Any, SkipPlan]],
          speculative: dict | None = None, rows: int = 8,
          num_slots: int | None = None, steps: int = 4, host: str = "127.0.0.1",
          port: int = 8000, default_max_tokens: int = 256, drain_s: float = 10.0) -> None:
  """Builds and warms up a pool per plan (`build_pools`), then serves until SIGINT / SIGTERM:
  in-flight requests get drain_s seconds to finish, the rest are cancelled."""
  num_slots = num_slots or min(model.cfg.max_position, 2048)
  pools, names = build_pools(model, tokenizer, model_name=model_name, plans=plans,
                             speculative=speculative, rows=rows, num_slots=num_slots, steps=steps)
  for name, pool in pools.items():
    seconds = pool.warm_up()
    layers = (f"drafts with {pool.strategy.draft}" if isinstance(pool, slots.SpeculativePool)
              else pool.plan.skip)
    log.warning("%s: %s, %d rows x %d slots, prompt buckets %s, built in %.1f s", name, layers,
                rows, num_slots, pool.buckets, seconds)
  metrics = Metrics(list(pools))
  state = ServerState(model_name=model_name, tokenizer=tokenizer, pools=pools, ratios=names,
                      scheduler=Scheduler(pools, metrics, decode.special_ids(tokenizer)[0]),
                      metrics=metrics, default_max_tokens=default_max_tokens)
  uvicorn.run(create_app(state), host=host, port=port, log_level="warning",
              timeout_graceful_shutdown=drain_s)
