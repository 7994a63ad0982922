r"""ViT (6 blocks, dim 256, 8 heads, FFN 512, 4x4 patches) on CIFAR-10 through tfds, Adam.

COMMAND:
  python -m regime_jax.main --config experiments/vit_cifar10.py --workdir runs/vit_cifar10
  Needs the dataset prepared as array_record (network once): `tfds build cifar10
  --file_format=array_record`, or `--config.dataset.data_dir=<dir>` pointing at it. Without
  it the run stops with an error saying so; it never substitutes other data.

EXPECTED: not measured on this machine (offline); an accelerator is recommended.
"""

import ml_collections

from regime_jax.config import base_config, smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = base_config()
    c.dataset.name = "cifar10"
    c.probe.size = 512
    c.model = ml_collections.ConfigDict(
        dict(
            name="transformer",
            embed="patch",
            patch_size=4,
            num_layers=6,
            dim=256,
            num_heads=8,
            mlp_dim=512,
            positions="learned",
            pool="mean",
            activation="relu",
        )
    )
    c.optimizer.name, c.optimizer.learning_rate = "adam", 5e-4
    c.optimizer.schedule, c.optimizer.warmup_steps = "cosine", 1000
    c.num_steps = 20000
    c.record.snapshot_every_steps = 1000
    c.log_every_steps = c.eval_every_steps = 500
    if arg == "quick":
        smoke(c, num_steps=20, probe_size=32, batch_size=16)
        c.optimizer.warmup_steps = 5
        c.model.num_layers, c.model.dim, c.model.num_heads, c.model.mlp_dim = 1, 16, 2, 32
    return c
