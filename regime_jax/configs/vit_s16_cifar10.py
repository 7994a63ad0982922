r"""ViT-S/16-style (12 blocks, dim 384, 6 heads, ReLU FFN 1536, CLS) on CIFAR-10, Adam.

ViT-S's shape (Touvron et al. 2021; Beyer et al. 2022) with a ReLU FFN, on 32x32 images:
patch 16 would leave 4 tokens, so patches are 4x4 (64 tokens + the CLS token, 65 positions,
the token count of ViT-S/16 at 128x128 pixels). Learned positions, pre-LN, no dropout, no
augmentation. Patterns are recorded in every block's FFN at every token position (12
layers of ``[P, 65, 1536]``), every 10 steps. ``vit_cifar10`` is the smaller sibling
(6 blocks, dim 256, mean pool).

COMMAND:
  python -m regime_jax.main --config vit_s16_cifar10 --workdir runs/vit_s16_cifar10
  Needs the dataset prepared as array_record (network once): `tfds build cifar10
  --file_format=array_record`, or `--config.dataset.data_dir=<dir>` pointing at it. Without
  it the run stops with an error saying so; it never substitutes other data. bfloat16
  compute: `--config.model.compute_dtype=bfloat16`.
  Smoke test, offline: --config vit_s16_cifar10:quick (one block of dim 16 on the embedded
  8x8 digits in 2x2 patches, 20 steps).

EXPECTED: the full run is not measured on this machine (offline); an accelerator is
  recommended. :quick: about 10 s on 2 shared CPU cores (mostly compilation).
"""

from regime_jax.configs import transformer_mnist1d, vit_cifar10
from regime_jax.configs.base import smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = vit_cifar10.get_config()
    c.model.num_layers, c.model.dim, c.model.num_heads, c.model.mlp_dim = 12, 384, 6, 1536
    c.model.patch_size, c.model.pool = 4, "cls"
    c.model.compute_dtype = "float32"  # float32 | bfloat16 (bf16 compute, f32 params)
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 5e-4, 1000
    c.record.every_steps = 10
    if arg == "quick":  # offline: the embedded digits, one small block
        c.dataset.name, c.dataset.seed = "digits", 0
        smoke(c, num_steps=20, probe_size=32, batch_size=16)
        c.record.every_steps = 1
        transformer_mnist1d.shrink(c)
        c.model.patch_size = 2
    return c
