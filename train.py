"""Skip-aware fine-tuning.

  python train.py --config configs/bible_2x.py --workdir runs/bible_2x [--config.num_steps=100]
"""

import logging as std_logging
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from ulskip_jax import train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the tokenizer go "
                    "(default: runs/<config name>).")
flags.mark_flags_as_required(["config"])


def _quiet_abandoned_reads():
  """Sends Python's reports of exceptions nobody can catch to the debug log (--verbosity=1).

  When Orbax fails to restore a corrupt checkpoint it abandons its other TensorStore reads, which
  then fail on a closed event loop (unraisable exceptions) or are collected unretrieved (asyncio's
  "Task exception was never retrieved"): a traceback each, printed around the one-line error.
  """
  sys.unraisablehook = lambda u: logging.debug("ignored in %r: %s", u.object, u.exc_value)

  def to_debug(record):
    logging.debug("asyncio: %s", record.getMessage())
    return False
  std_logging.getLogger("asyncio").addFilter(to_debug)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {argv[1:]}")
  name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
  workdir = FLAGS.workdir or os.path.join("runs", name)
  try:
    metrics = train_lib.train_and_evaluate(FLAGS.config, workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in sorted(metrics.items())))


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  _quiet_abandoned_reads()
  try:  # unknown --config.key, bad value or config file: one line, not a traceback
    argv = FLAGS(sys.argv)
  except AttributeError as e:  # ml_collections' way of saying the key does not exist
    key = str(e).strip("\"'")
    print(f"error: unknown config key {key!r}: see configs/base.py for the allowed keys",
          file=sys.stderr)
    sys.exit(2)
  except (flags.Error, KeyError, TypeError, ValueError) as e:
    print(f"error: bad flag or config: {e}", file=sys.stderr)
    sys.exit(2)
  main(argv)
