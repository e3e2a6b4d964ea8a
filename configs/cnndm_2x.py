r"""CNN / DailyMail summarisation from a pretrained base model, skip-aware at 2x.

  python train.py --config configs/cnndm_2x.py --workdir runs/cnndm_2x \
      --config.model.init_from=/path/to/bloomz-560m

`cnn_dailymail` / `3.0.0` from the Hub (article -> highlights), so the Hub must be reachable, or
the dataset cached and HF_DATASETS_OFFLINE=1 set; offline, the run stops within seconds with one
line pointing to configs/bible_2x.py. Articles are long: rows hold 1024 tokens and an article that
does not fit loses its end (the highlights and the template's "Summary:" always survive). Paper
mode at 2x with frozen embeddings, as configs/wmt_2x.py. The loop's eval reports val_loss / val_ppl
and greedy BLEU / chrF at ratios 1 and 2 (ROUGE, the usual summarisation score: infer.py
--metric rouge on the outputs). Not run in this repository's offline CI, so no time or score is
claimed here.
"""

from configs import wmt_2x


def get_config():
  c = wmt_2x.get_config()
  c.batch_size = 16
  c.data.hf_name = "cnn_dailymail"
  c.data.hf_config = "3.0.0"
  c.data.source_field = "article"
  c.data.target_field = "highlights"
  c.data.max_examples = 50_000
  c.data.template = "Summarize the article.\nArticle: {source}\nSummary:"
  c.data.seq_len = 1024
  c.data.pack = False           # one article per row: packing gains nothing at this length
  c.eval_bleu_examples = 32
  c.eval_max_new_tokens = 128
  return c
