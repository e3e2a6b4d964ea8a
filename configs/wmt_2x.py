r"""WMT14 German -> English from a pretrained base model (e.g. BLOOMZ), skip-aware at 2x.

  python train.py --config configs/wmt_2x.py --workdir runs/wmt_2x \
      --config.model.init_from=/path/to/bloomz-560m

`init_from` is a local Hugging Face folder (config.json, safetensors, tokenizer files); its
architecture and tokenizer replace the `model` fields below except dtype / param_dtype. The data is
the Hub's `wmt14` / `de-en` (translation.de -> translation.en; 4.5M training pairs, of which the
first `max_examples` are used), so the Hub must be reachable, or the dataset cached and
HF_DATASETS_OFFLINE=1 set; offline, the run stops within seconds with one line pointing to
configs/bible_2x.py. TFDS instead (prepared under DIR):
  --config.data.source=tfds --config.data.tfds_name=wmt14_translate/de-en
  --config.data.tfds_data_dir=DIR --config.data.source_field=de --config.data.target_field=en

Recipe (the ULS paper's fine-tuning setting): prompt at full depth, response through the
int(L / 2) kept layers (paper mode), loss on the response only, embeddings frozen. Logged every
eval: val_loss / val_ppl and greedy BLEU / chrF on 64 validation pairs at ratios 1 and 2, so the
2x model can be read against the full-depth one it was made from. Not run in this repository's
offline CI (no Hub access), so no time or score is claimed here.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.num_steps = 2000
  c.batch_size = 32
  c.eval_every = 500
  c.eval_ratios = (1.0, 2.0)
  c.eval_bleu_examples = 64
  c.eval_max_new_tokens = 128
  c.data.source = "hf"
  c.data.hf_name = "wmt14"
  c.data.hf_config = "de-en"
  c.data.source_field = "translation.de"
  c.data.target_field = "translation.en"
  c.data.max_examples = 200_000  # per split (validation and test hold ~3,000 each)
  c.data.template = "Translate German to English: {source}\nEnglish:"
  c.data.seq_len = 256
  c.skip.ratio = 2.0
  c.skip.mode = "paper"
  c.optim.lr = 2e-5             # full fine-tuning of a pretrained model
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.optim.freeze_embeddings = True
  c.checkpoint.every = 500
  return c
