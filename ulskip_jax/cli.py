"""What train.py and infer.py share: one line per error, exit codes, a quiet teardown.

Exit codes: 0 done; 1 an internal error (a bug: `--verbose` shows the traceback); 2 bad input
(a config value, a flag, a file, a checkpoint: the line says what to change); 130 interrupted
(Ctrl-C). Whatever reaches `run` becomes one line on stderr, the traceback only with `verbose`.
"""

from __future__ import annotations

import logging as std_logging
import sys
import traceback
from typing import Callable

OK, INTERNAL_ERROR, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130
# Errors that mean "the input is wrong" (ValueError covers ConfigError, CheckpointError,
# DataError, UsageError); OSError: a file that is missing, unreadable or unwritable.
BAD_INPUT_ERRORS = (ValueError, OSError, FloatingPointError)


def one_line(e: BaseException) -> str:
  """The first line of an exception's message (TensorStore and Orbax add dozens)."""
  text = str(e).strip()
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = repr(e.args[0])
  return (text.splitlines() or [""])[0]


def report(e: BaseException, verbose: bool = False) -> int:
  """Prints `e` as one line on stderr (after its traceback, with `verbose`); its exit code."""
  _end_progress_bars()
  if verbose:
    traceback.print_exception(e, file=sys.stderr)
  if isinstance(e, KeyboardInterrupt):  # with a message: an orderly stop (train_lib.Interrupted)
    print(one_line(e) or "error: interrupted", file=sys.stderr, flush=True)
    return INTERRUPTED
  if isinstance(e, BAD_INPUT_ERRORS):
    message = one_line(e)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
      message = f"{e.filename}: {e.strerror}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    return BAD_INPUT
  hint = "" if verbose else " (a bug: rerun with --verbose for the traceback and report it)"
  print(f"internal error: {type(e).__name__}: {one_line(e)}{hint}", file=sys.stderr, flush=True)
  return INTERNAL_ERROR


def run(main: Callable[[], object], verbose: bool = False) -> int:
  """Calls `main()`; returns 0, or the exit code of what it raised, reported in one line."""
  quiet_abandoned_reads()
  try:
    main()
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    return report(e, verbose)
  return OK


def _end_progress_bars() -> None:
  """Closes open tqdm bars, so an error starts on its own line instead of after a bar."""
  tqdm = sys.modules.get("tqdm")
  for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
    bar.close()


def quiet_abandoned_reads() -> None:
  """Sends Python's reports of exceptions nobody can catch to the debug log.

  When Orbax fails to restore a corrupt checkpoint it abandons its other TensorStore reads, which
  then fail on a closed event loop (unraisable exceptions, 'Exception ignored in ...') or are
  collected unretrieved (asyncio's 'Task exception was never retrieved'): a traceback each,
  hundreds of lines around the one-line error.
  """
  from absl import logging
  sys.unraisablehook = lambda u: logging.debug("ignored in %r: %s", u.object, u.exc_value)

  def to_debug(record):
    logging.debug("asyncio: %s", record.getMessage())
    return False
  asyncio_logger = std_logging.getLogger("asyncio")
  if not any(getattr(f, "__name__", "") == "to_debug" for f in asyncio_logger.filters):
    asyncio_logger.addFilter(to_debug)
