r"""ReLU CNN (conv64-conv128-conv256, max pool 2, dense 256) on CIFAR-10 through tfds, Adam.

``cnn_mnist`` on CIFAR-10: three wider convs, a cosine schedule with warmup, longer.

COMMAND:
  python -m regime_jax.main --config cnn_cifar10 --workdir runs/cnn_cifar10
  Needs the dataset prepared as array_record (network once): `tfds build cifar10
  --file_format=array_record`, or `--config.dataset.data_dir=<dir>` pointing at it. Without
  it the run stops with an error saying so; it never substitutes other data.

EXPECTED: not measured on this machine (offline); an accelerator is recommended.
"""

from regime_jax.configs import cnn_mnist
from regime_jax.configs.base import smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = cnn_mnist.get_config()
    c.dataset.name = "cifar10"
    c.probe.size = 512
    c.model.channels, c.model.dense = (64, 128, 256), (256,)
    c.optimizer.schedule, c.optimizer.warmup_steps = "cosine", 500
    c.num_steps = 10000
    c.record.snapshot_every_steps = 500
    c.log_every_steps = c.eval_every_steps = 500
    if arg == "quick":
        smoke(c, num_steps=20, probe_size=32, batch_size=16)
        c.optimizer.warmup_steps = 5
        c.model.channels, c.model.dense = (4, 8, 8), (16,)
    return c
