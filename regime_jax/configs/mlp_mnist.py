r"""ReLU MLP 784-512-512-10 on MNIST through tensorflow-datasets (needs a one-time download).

``mlp_mnist1d`` scaled to MNIST: wider layers, a larger probe set, sparser logging.

COMMAND:
  python -m regime_jax.main --config mlp_mnist --workdir runs/mlp_mnist
  Needs the dataset prepared as array_record (network once): `tfds build mnist
  --file_format=array_record`, or `--config.dataset.data_dir=<dir>` pointing at it. Without
  it the run stops with an error saying so; it never substitutes other data.

EXPECTED: not measured on this machine (offline); an accelerator is recommended.
"""

from regime_jax.configs import mlp_mnist1d
from regime_jax.configs.base import smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = mlp_mnist1d.get_config()
    c.dataset.name = "mnist"
    c.probe.size = 1024
    c.model.hidden = (512, 512)
    c.optimizer.learning_rate = 0.02
    c.num_steps = 5000
    c.record.snapshot_every_steps = 250
    c.log_every_steps = c.eval_every_steps = 250
    if arg == "quick":
        smoke(c, num_steps=20, probe_size=32, batch_size=16)
        c.model.hidden = (64, 64)
    return c
