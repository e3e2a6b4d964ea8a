"""Shared defaults; experiment configs override a few fields. Not meant to be run alone."""

import ml_collections

from ulskip_jax.sharding import DEFAULT_RULES, MESH_AXES


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 1000            # optimizer updates
  c.batch_size = 32             # global rows per update (split over hosts and micro-batches)
  c.log_every = 10              # steps between JSONL / TensorBoard points
  c.progress_bar = True
  c.eval_every = 500            # steps between evaluations (0 = only at the end... of nothing)
  c.eval_batches = 8            # validation batches per ratio for the loss
  c.eval_ratios = ()            # ratios evaluated; () = the training ratio(s)
  c.eval_bleu_examples = 64     # validation examples decoded greedily for BLEU (0 = off)
  c.eval_max_new_tokens = 96    # decode budget per example, tokens

  c.model = ml_collections.ConfigDict()
  c.model.init_from = ""        # Hugging Face folder of the base model; "" = from scratch
  c.model.num_layers = 12
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 64
  c.model.d_ff = 1024
  c.model.norm = "rms"
  c.model.norm_eps = 1e-6
  c.model.mlp = "gated"
  c.model.act = "silu"
  c.model.pos = "rope"
  c.model.max_position = 2048
  c.model.rope_theta = 10000.0
  c.model.tie_embeddings = True
  c.model.dtype = "float32"     # compute dtype; the loss is always f32
  c.model.param_dtype = "float32"
  c.model.remat = False         # rematerialise each layer in the backward pass
  c.model.attention_impl = "einsum"  # einsum | xla | cudnn (NVIDIA, bf16/f16) | auto: cudnn
                                     # where it fits, else einsum (docs/accelerators.md)

  c.data = ml_collections.ConfigDict()
  c.data.source = "bible"       # bible (offline) | hf | tfds
  c.data.cache_dir = "~/.cache/ulskip_jax"
  c.data.hf_name = ""           # e.g. wmt14, with hf_config de-en
  c.data.hf_config = ""
  c.data.hf_files = ""          # local json/jsonl/csv/parquet file(s) instead of a hub name
  c.data.tfds_name = ""         # e.g. wmt14_translate/de-en
  c.data.tfds_data_dir = ""
  c.data.source_field = "source"  # dotted path into an example, e.g. translation.de
  c.data.target_field = "target"
  c.data.max_examples = 0       # per split; 0 = all
  c.data.template = "KJV: {source}\nWEB:"
  c.data.chat = False           # prompt = the user turn of the tokenizer's chat template
  c.data.seq_len = 128          # tokens per packed row
  c.data.pack = True
  c.data.vocab_size = 4096      # BPE size when training from scratch

  c.skip = ml_collections.ConfigDict()
  c.skip.ratio = 2.0            # target speedup r: keep int(L / r) layers
  c.skip.ratios = ()            # if set, one ratio drawn per step from these (multi-ratio)
  c.skip.strategy = "uls"
  c.skip.keep = ()              # layers every plan keeps (uls, calibrated), e.g. Gemma's globals
  # strategy "calibrated" (ulskip_jax/calibrate.py): a plan chosen on the training data, kept in
  # the workdir as plan.json; or this plan.json ("" = calibrate on the first start).
  c.skip.plan_file = ""
  c.skip.calibration_method = "kl_greedy"  # kl_greedy (greedy KL removal) | block_influence
  c.skip.calibration_tokens = 1024  # response tokens of training text the calibration scores
  c.skip.calibration_keep_ends = True  # calibrated plans never skip the first and last layers
  c.skip.mode = "paper"         # paper: prompt at full depth | everywhere
  c.skip.full_depth_steps = 0   # first steps at full depth (base-model training from scratch)
  # Paper mode: skipped layers run on a buffer of this fraction of seq_len prompt tokens per row
  # (rounded up to 8); a micro-batch with a longer prompt share runs them on whole rows (same
  # result, full-depth cost). 1.0 = always whole rows.
  c.skip.prompt_capacity = 0.75
  # The buffer or whole rows (same losses and gradients): "auto" = the buffer where its saved
  # work outweighs its gathers and scatters on this platform (`prompt_buffer.choose`, decided at
  # startup from the shapes; a small model on a GPU takes whole rows) | "on" | "off".
  c.skip.prompt_buffer = "auto"

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.final_lr_fraction = 0.1
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.clip_norm = 1.0
  c.optim.accum_steps = 1       # micro-batches per update
  c.optim.freeze_embeddings = False
  c.optim.lora = ml_collections.ConfigDict()  # LoRA (ulskip_jax/lora.py): train adapters only
  c.optim.lora.rank = 0         # adapter rank; 0 = off (full fine-tuning, no adapters)
  c.optim.lora.alpha = 16.0     # adapter output scale alpha / rank
  c.optim.lora.dropout = 0.0    # dropout on each adapter's input while training, in [0, 1)
  c.optim.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # gate: gated MLPs only
  c.optim.lora.train_norms = False  # also train the norm scales (and LayerNorm biases)

  # Distillation (docs/distillation.md): the skipped path's loss on response tokens becomes
  # alpha * KL(teacher || student) + (1 - alpha) * CE, the teacher at full depth, no gradient.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ""        # "" = off (CE) | "self" (these weights, this step) | "init" (the
                                # frozen model.init_from weights) | a workdir, HF folder or .gguf
  c.distill.alpha = 0.5         # weight of the KL term, in [0, 1]
  c.distill.temperature = 1.0   # softmax temperature of the KL (> 0); the KL is scaled by T^2
  c.distill.sandwich = False    # teacher "self": CE at full depth + KD of the smallest sub-model
                                # (largest ratio) and one other drawn ratio, one step

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500      # steps
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  c.checkpoint.resume = True    # continue from the latest checkpoint in the workdir
  c.checkpoint.resume_step = 0  # 0 = latest; N = that step (e.g. when the latest is corrupt)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = MESH_AXES
  c.mesh.shape = (-1, 1, 1)     # data, fsdp, tensor; -1 = all remaining devices
  c.mesh.rules = DEFAULT_RULES

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = single host / auto
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.auto = True     # jax.distributed.initialize() on TPU pods / SLURM
  return c
