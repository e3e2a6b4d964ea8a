"""The OpenAI-compatible server (serve.py), run as a subprocess on a tiny model and spoken to
with the official `openai` client and plain HTTP: greedy answers equal `generate` on each prompt
alone at its plan, bad requests get OpenAI's error shape naming the field, cancelled and
disconnected requests free their rows, and SIGTERM drains.

One server for the file: a row holds 16 positions, so each plan builds two executables. The
model folder carries a calibrated plan.json whose 2x plan is not ULS's, as a trained workdir's
would: the server must serve the checkpoint's own plans (and draft with them)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from ulskip_jax import decode, hf, skipping
from ulskip_jax import testing as tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "tinyllm"
SLOTS = 16
CHAT_TEMPLATE = ("{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w5 {% endif %}")
# At 2x it skips layers 2 and 3; ULS's plan skips 1 and 2.
CALIBRATED = skipping.LayerScores(4, "kl_greedy", (None, 1.0, 0.5, 0.0))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp(NAME)
  tiny.save_hf_model("llama", path)
  tok = tiny.save_tiny_tokenizer(path)
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(path)
  skipping.write_plan(str(path / skipping.PLAN_FILE), CALIBRATED, (2,))
  return path


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
  """(base url, process) of a server at ratios 1 and 2 and lossless, 4 rows each; its output goes to a file
  (a pipe nobody reads could fill and block it)."""
  port = free_port()
  log = open(tmp_path_factory.mktemp("server") / "log.txt", "w+")
  proc = subprocess.Popen(
      [sys.executable, "serve.py", "--checkpoint", str(folder), "--ratios", "1,2",
       "--speculative", "draft_ratio=2,k=3",
       "--batch-size", "4", "--max-seq-len", str(SLOTS), "--steps-per-call", "3", "--port",
       str(port), "--served-model-name", NAME, "--max-tokens", "8", "--drain-seconds", "20"],
      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log = log
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 300
  while time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"the server exited ({proc.returncode}): {server_log(proc)[-2000:]}")
    try:
      if httpx.get(url + "/health", timeout=1).status_code == 200:
        break
    except httpx.HTTPError:
      time.sleep(0.5)
  else:
    proc.kill()
    pytest.fail("the server did not come up in 300 s")
  yield url, proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()
  log.close()


def server_log(proc) -> str:
  proc.log.flush()
  proc.log.seek(0)
  return proc.log.read()


@pytest.fixture(scope="module")
def reference(folder, fast_engine_compile):
  """(model, tokenizer) in this process, for `generate`."""
  return hf.from_pretrained(folder)


def metrics(url: str) -> dict[str, float]:
  text = httpx.get(url + "/metrics").text
  return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def rows_in_use(url: str) -> float:
  m = metrics(url)
  return sum(v for k, v in m.items() if k.startswith(("ulskip_running_rows",
                                                      "ulskip_queue_length")))


def wait_idle(url: str, timeout: float = 15) -> None:
  deadline = time.time() + timeout
  while rows_in_use(url) and time.time() < deadline:
    time.sleep(0.2)
  assert rows_in_use(url) == 0, "rows or queue entries leaked: " + str(metrics(url))


def test_models_health_and_metrics(server):
  url, _ = server
  assert httpx.get(url + "/health").json() == {"status": "ok"}
  ids = [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="-").models.list()]
  assert ids == [NAME, NAME + "@2x", NAME + "@lossless"]
  m = metrics(url)
  assert m[f'ulskip_running_rows{{plan="{NAME}@2x"}}'] == 0
  assert "ulskip_tokens_per_second" in m


def test_sixteen_concurrent_greedy_requests_equal_generate_alone(server, reference):
  """Mixed plans (by name and by skip_ratio), lengths, streaming and not, completions and chat:
  each answer is `generate`'s for that prompt alone at that plan (lossless: at full depth)."""
  url, proc = server
  model, tok = reference
  client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-")
  rng = random.Random(0)
  cases = []
  for i in range(16):
    words = " ".join(f"w{rng.randrange(3, tiny.VOCAB)}" for _ in range(rng.randrange(1, 9)))
    ratio, max_tokens = (1, 2, "lossless")[i % 3], rng.randrange(2, SLOTS - 8)
    suffix = "@lossless" if ratio == "lossless" else f"@{ratio}x"
    how = dict(model=NAME + suffix) if ratio != 1 and i % 2 else dict(
        model=NAME, extra_body=dict(skip_ratio=ratio))
    cases.append((words, ratio, max_tokens, i % 4 == 0, i % 5 == 0, how))

  async def ask(words, ratio, max_tokens, stream, chat, how):
    kw = dict(how, max_tokens=max_tokens, temperature=0, stream=stream)
    if stream:
      kw["stream_options"] = dict(include_usage=True)
    if chat:
      out = await client.chat.completions.create(
          messages=[dict(role="user", content=words)], **kw)
    else:
      out = await client.completions.create(prompt=words, **kw)
    if not stream:
      choice = out.choices[0]
      return (choice.message.content if chat else choice.text), out.usage.completion_tokens
    text, usage = "", None
    async for chunk in out:
      if chunk.choices:
        text += (chunk.choices[0].delta.content or "") if chat else chunk.choices[0].text
      usage = chunk.usage or usage
    return text, usage.completion_tokens

  async def all_of_them():
    return await asyncio.gather(*(ask(*c) for c in cases))

  answers = asyncio.run(all_of_them())
  for (words, ratio, max_tokens, stream, chat, _), (text, used) in zip(cases, answers):
    prompt = decode.encode_prompt(tok, words, chat=chat)
    [ids], _ = decode.generate(model, [prompt], max_new_tokens=max_tokens, eos_id=2,
                               skip=CALIBRATED.plan(1 if ratio == "lossless" else ratio))
    assert text == decode.decode_ids(tok, ids), (words, ratio, stream, chat)
    assert used == min(len(ids) + 1, max_tokens)  # the EOS that ended it is counted
  assert any(len(text.split()) >= 4 for text, _ in answers)
  wait_idle(url)
  log = server_log(proc)  # the plans served, as the startup log names them
  assert f"{NAME}@2x: calibrated 2/4 layers (skips 2 3)," in log, log
  assert f"{NAME}@lossless: drafts with calibrated 2/4 layers (skips 2 3)," in log, log


def test_stop_strings_seed_and_usage(server):
  url, _ = server
  client = openai.OpenAI(base_url=url + "/v1", api_key="-")
  full = client.completions.create(model=NAME, prompt="w5 w9 w11", max_tokens=8, temperature=0)
  words = full.choices[0].text.split()
  assert len(words) >= 3, full
  stop = " " + words[2]
  cut = client.completions.create(model=NAME, prompt="w5 w9 w11", max_tokens=8, temperature=0,
                                  stop=[stop])
  assert cut.choices[0].text == full.choices[0].text[:full.choices[0].text.index(stop)]
  assert cut.choices[0].finish_reason == "stop"
  streamed = "".join(c.choices[0].text for c in client.completions.create(
      model=NAME, prompt="w5 w9 w11", max_tokens=8, temperature=0, stop=stop, stream=True))
  assert streamed == cut.choices[0].text
  assert full.usage.prompt_tokens == 3
  sampled = [client.completions.create(model=NAME + "@2x", prompt="w5", max_tokens=8,
                                       temperature=1.0, top_p=0.9, seed=s).choices[0].text
             for s in (1, 1, 2)]
  assert sampled[0] == sampled[1]
  wait_idle(url)


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "tinyllm", "prompt": "w5"', 400, None),                       # malformed JSON
    ('{"model": "gpt-4", "prompt": "w5"}', 404, "model"),
    ('{"model": "tinyllm", "prompt": "' + "w5 " * 20 + '"}', 400, "prompt"),  # oversized
    ('{"model": "tinyllm", "prompt": "w5 w6", "max_tokens": 16}', 400, "max_tokens"),
    ('{"model": "tinyllm", "prompt": "w5", "n": 2}', 400, "n"),
    ('{"model": "tinyllm", "prompt": "w5", "temperature": -1}', 400, "temperature"),
    ('{"model": "tinyllm", "prompt": [5, 500]}', 400, "prompt"),
    ('{"model": "tinyllm", "prompt": "w5", "skip_ratio": 3}', 400, "skip_ratio"),
    ('{"model": "tinyllm@2x", "prompt": "w5", "skip_ratio": 1}', 400, "skip_ratio"),
    ('{"model": "tinyllm"}', 400, "prompt"),
    ('{"model": "tinyllm@lossless", "prompt": "w5", "temperature": 0.5}', 400, "temperature"),
    ('{"model": "tinyllm", "prompt": "w5", "logprobs": 2}', 400, "logprobs"),
])
def test_bad_requests_get_the_openai_error_shape(server, body, status, param):
  url, _ = server
  r = httpx.post(url + "/v1/completions", content=body,
                 headers={"Content-Type": "application/json"})
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
  assert error["message"] and "\n" not in error["message"]
  if param:
    assert param in error["message"]


def test_bad_chat_request(server):
  url, _ = server
  r = httpx.post(url + "/v1/chat/completions", json=dict(model=NAME, messages=[]))
  assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    openai.OpenAI(base_url=url + "/v1", api_key="-").chat.completions.create(
        model="nope", messages=[dict(role="user", content="w5")])


def test_many_clients_with_cancellations_leak_no_rows(server):
  """200 requests from 32 concurrent clients, a third cancelled at random points (streams
  closed, requests abandoned), bad ones mixed in: every valid request is answered, the server
  stays up and every row comes back."""
  url, proc = server
  rng = random.Random(1)

  async def one(client, i):
    kind = rng.choice(["ok", "ok", "stream", "cancel", "cancel_stream", "bad"])
    model = rng.choice([NAME, NAME + "@2x", NAME + "@lossless"])
    body = dict(model=model, max_tokens=rng.randrange(1, 9),
                prompt=" ".join(f"w{rng.randrange(3, 97)}" for _ in range(rng.randrange(1, 8))),
                temperature=0 if model.endswith("lossless") else rng.choice([0, 0.8]), seed=i)
    if kind == "bad":
      body["prompt"] = "w5 " * 30
      r = await client.post("/v1/completions", json=body)
      return r.status_code == 400
    if kind in ("stream", "cancel_stream"):
      body["stream"] = True
      async with client.stream("POST", "/v1/completions", json=body) as r:
        lines = 0
        async for line in r.aiter_lines():
          lines += bool(line)
          if kind == "cancel_stream" and lines >= rng.randrange(1, 3):
            return True  # leaving the block closes the connection mid-stream
          if line == "data: [DONE]":
            return kind == "stream"
      return False
    task = asyncio.ensure_future(client.post("/v1/completions", json=body))
    if kind == "cancel":
      await asyncio.sleep(rng.uniform(0, 0.05))
      task.cancel()
      return True
    r = await task
    return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")

  async def run_all():
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
      gate = asyncio.Semaphore(32)

      async def bounded(i):
        async with gate:
          try:
            return await one(client, i)
          except asyncio.CancelledError:
            return True
      return await asyncio.gather(*(bounded(i) for i in range(200)))

  results = asyncio.run(run_all())
  assert all(results), [i for i, ok in enumerate(results) if not ok]
  assert proc.poll() is None
  wait_idle(url)
  cancelled = sum(v for k, v in metrics(url).items()
                  if k.startswith("ulskip_requests_finished_total") and "cancelled" in k)
  assert cancelled > 0
  assert httpx.post(url + "/v1/completions", json=dict(model=NAME, prompt="w5", max_tokens=2,
                                                       temperature=0)).status_code == 200


def test_sigterm_lets_a_running_request_finish(server):
  """Last: it stops the server."""
  url, proc = server

  async def stream_while_terminated():
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
      body = dict(model=NAME, prompt="w5 w6", max_tokens=10, temperature=0, stream=True)
      async with client.stream("POST", "/v1/completions", json=body) as r:
        lines = []
        async for line in r.aiter_lines():
          if line and not lines:
            proc.send_signal(signal.SIGTERM)
          lines += [line] if line else []
        return lines

  lines = asyncio.run(stream_while_terminated())
  assert lines[-1] == "data: [DONE]" and '"finish_reason": null' in lines[0]
  # uvicorn re-raises the signal once it has shut down, so supervisors see a SIGTERM exit.
  assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
  assert "Traceback" not in server_log(proc), server_log(proc)[-3000:]
