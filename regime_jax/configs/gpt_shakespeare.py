r"""GPT-style character model (6 blocks, dim 384, 6 heads, ReLU FFN 1536) on tiny_shakespeare.

A causal decoder (pre-LN, learned positions, tied embeddings, no dropout) trained on
next-character prediction over 256-character sequences of tfds ``tiny_shakespeare`` (the
nanoGPT "shakespeare_char" shape, with a ReLU FFN). The loss is the per-token cross-entropy,
``eval/acc`` the next-character accuracy. Patterns are recorded in every block's FFN at every
position of 64 fixed validation sequences (``[64, 256, 1536]`` per layer: 25 M bits per
layer), every 10 steps.

COMMAND:
  python -m regime_jax.main --config gpt_shakespeare --workdir runs/gpt_shakespeare
  Needs the dataset prepared as array_record (network once): `tfds build tiny_shakespeare
  --file_format=array_record`, or `--config.dataset.data_dir=<dir>` pointing at it. Without
  it the run stops with an error saying so; it never substitutes other data. bfloat16
  compute: `--config.model.compute_dtype=bfloat16`.
  Smoke test, offline: --config gpt_shakespeare:quick (one block of dim 16 on 32-character
  sequences of the embedded synthetic_text grammar, 20 steps).

EXPECTED: the full run is not measured on this machine (offline); an accelerator is
  recommended (nanoGPT's comparable char model reaches a validation loss of about 1.5).
  :quick: about 10 s on 2 shared CPU cores (mostly compilation).
"""

import ml_collections

from regime_jax.configs import transformer_mnist1d
from regime_jax.configs.base import smoke, variant

SEQ_LEN = 256


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = transformer_mnist1d.get_config()
    c.dataset.name = "tiny_shakespeare"
    c.dataset.seq_len = SEQ_LEN  # characters per sequence (inputs; targets shifted by one)
    c.probe.size = 64
    c.model = ml_collections.ConfigDict(
        dict(
            name="gpt",
            num_layers=6,
            dim=384,
            num_heads=6,
            mlp_dim=1536,
            context=SEQ_LEN,  # >= dataset.seq_len
            tie_embeddings=True,
            activation="relu",
            compute_dtype="float32",  # float32 | bfloat16 (bf16 compute, f32 params)
        )
    )
    c.optimizer.name, c.optimizer.learning_rate = "adam", 1e-3
    c.optimizer.schedule, c.optimizer.warmup_steps = "cosine", 100
    c.batch_size, c.num_steps = 64, 5000
    c.eval_batch_size = 64
    c.record.every_steps, c.record.snapshot_every_steps = 10, 500
    c.log_every_steps = c.eval_every_steps = 250
    if arg == "quick":  # offline: the embedded synthetic grammar, one small block
        c.dataset.name, c.dataset.num_samples, c.dataset.seq_len = "synthetic_text", 200, 32
        smoke(c, num_steps=20, probe_size=16, batch_size=16)
        c.record.every_steps = 1
        transformer_mnist1d.shrink(c)
        c.model.context = 32
    return c
