"""Skip-aware fine-tuning.

  python train.py --config configs/bible_2x.py --workdir runs/bible_2x [--config.num_steps=100]

Every config value and the workdir are checked before any data is read (ulskip_jax.config_check):
a mistake is one line on stderr and exit code 2. Ctrl-C or SIGTERM: the current step finishes, a
checkpoint is saved and the run stops (exit code 130 after Ctrl-C, 0 after SIGTERM); a second
Ctrl-C stops at once. The same command resumes. Exit code 1 is an internal error: --verbose
prints its traceback.
"""

import os
import re
import sys

from absl import flags, logging
from ml_collections import config_flags

from ulskip_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the tokenizer go "
                    "(default: runs/<config name>).")
flags.DEFINE_bool("verbose", False, "On an error, print its traceback too; log at INFO level.")
flags.mark_flags_as_required(["config"])


class FlagError(ValueError):
  """A command-line flag or the config file is unusable (exit code 2)."""


def parse_flags(argv: list[str]):
  """(config, workdir) from the command line, or FlagError naming the flag."""
  try:
    rest = FLAGS(argv)
    config = FLAGS.config
    config.keys()  # a config file that failed to load raises here, on first use
  except (AttributeError, KeyError) as e:  # ml_collections' way of saying a key does not exist
    raise FlagError(_unknown_key(argv, str(e).strip("\"'"))) from None
  except flags.IllegalFlagValueError as e:
    match = re.match(r"flag (--[^=\s]+)=(.*?): (.*)", str(e), re.S)
    message = f"{match[1]}={match[2]} is invalid: {match[3]}" if match else str(e)
    if match and "must have a value other than None" in match[3]:
      message = f"{match[1]} is required: e.g. {match[1]} configs/bible_2x.py"
    raise FlagError(cli.one_line(ValueError(message))) from None
  except OSError as e:  # the config file: missing, unreadable (ml_collections chains two)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise FlagError(f"--config: cannot load the config file: {lines[-1] if lines else e}"
                    ) from None
  except flags.Error as e:
    raise FlagError(cli.one_line(e)) from None
  except Exception as e:  # pylint: disable=broad-except  (the config file's own code failed)
    raise FlagError(f"--config: the config file failed: {type(e).__name__}: {cli.one_line(e)}"
                    ) from e
  if len(rest) > 1:
    raise FlagError(f"unexpected arguments: {rest[1:]} (flags are --name=value)")
  name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
  return config, FLAGS.workdir or os.path.join("runs", name)


def _unknown_key(argv: list[str], key: str) -> str:
  """The unknown key's full path, from the --config.a.b=... flag that named it."""
  paths = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
  path = next((p for p in paths if key in p.split(".")), key)
  return (f"config key {path!r} is unknown (--config.{path}): see configs/base.py for the "
          "allowed keys")


def train(argv: list[str]) -> None:
  config, workdir = parse_flags(argv)
  if FLAGS.verbose:
    logging.set_verbosity(logging.INFO)
  from ulskip_jax import config_check
  config_check.validate_run(config, workdir)  # before the training stack is even imported
  from ulskip_jax import train_lib
  metrics = train_lib.train_and_evaluate(config, workdir)
  print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in sorted(metrics.items())))


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  verbose = any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=1") for a in argv[1:])
  return cli.run(lambda: train(argv), verbose)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  if code:  # no interpreter teardown: Orbax's and TensorStore's threads would report into it
    os._exit(code)
