r"""WMT14 German -> English, one model for several speedups: a ratio from (1, 2, 3, 5) per step.

  python train.py --config configs/wmt_multi.py --workdir runs/wmt_multi \
      --config.model.init_from=/path/to/bloomz-560m

Everything as configs/wmt_2x.py (data, template, paper mode, frozen embeddings, Hub needed),
except that each step draws its ratio from `skip.ratios` (the draw depends only on seed and step,
so a resumed run repeats it). XLA compiles one train step per ratio, four in all, the first time
each is drawn; the log's final `num_compiles` says 4. Evaluated at every trained ratio. Not run
in this repository's offline CI, so no time or score is claimed here.
"""

from configs import wmt_2x


def get_config():
  c = wmt_2x.get_config()
  c.skip.ratios = (1.0, 2.0, 3.0, 5.0)
  c.eval_ratios = (1.0, 2.0, 3.0, 5.0)
  c.num_steps = 4000            # each ratio sees about a quarter of the steps
  return c
