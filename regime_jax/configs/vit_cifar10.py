r"""ViT (6 blocks, dim 256, 8 heads, FFN 512, 4x4 patches) on CIFAR-10 through tfds, Adam.

``transformer_mnist1d`` on CIFAR-10 images cut into patches, with learned positions, wider
and longer.

COMMAND:
  python -m regime_jax.main --config vit_cifar10 --workdir runs/vit_cifar10
  Needs the dataset prepared as array_record (network once): `tfds build cifar10
  --file_format=array_record`, or `--config.dataset.data_dir=<dir>` pointing at it. Without
  it the run stops with an error saying so; it never substitutes other data.

EXPECTED: not measured on this machine (offline); an accelerator is recommended.
"""

from regime_jax.configs import transformer_mnist1d
from regime_jax.configs.base import smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = transformer_mnist1d.get_config()
    c.dataset.name = "cifar10"
    c.probe.size = 512
    c.model.embed, c.model.patch_size, c.model.positions = "patch", 4, "learned"
    c.model.num_layers, c.model.dim, c.model.num_heads, c.model.mlp_dim = 6, 256, 8, 512
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 5e-4, 1000
    c.batch_size, c.num_steps = 128, 20000
    c.record.snapshot_every_steps = 1000
    c.log_every_steps = c.eval_every_steps = 500
    if arg == "quick":
        smoke(c, num_steps=20, probe_size=32, batch_size=16)
        transformer_mnist1d.shrink(c)
    return c
