r"""ReLU CNN (conv32-conv64, max pool 2, dense 128) on MNIST through tensorflow-datasets, Adam.

COMMAND:
  python -m regime_jax.main --config experiments/cnn_mnist.py --workdir runs/cnn_mnist
  Needs the dataset prepared as array_record (network once): `tfds build mnist
  --file_format=array_record`, or `--config.dataset.data_dir=<dir>` pointing at it. Without
  it the run stops with an error saying so; it never substitutes other data.

EXPECTED: not measured on this machine (offline); an accelerator is recommended.
"""

import ml_collections

from regime_jax.config import base_config, smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = base_config()
    c.dataset.name = "mnist"
    c.probe.size = 1024
    c.model = ml_collections.ConfigDict(
        dict(
            name="cnn",
            dims=2,
            channels=(32, 64),
            kernel_size=3,
            pool="max",
            pool_size=2,
            dense=(128,),
            activation="relu",
        )
    )
    c.optimizer.name, c.optimizer.learning_rate = "adam", 1e-3
    c.num_steps = 5000
    c.record.snapshot_every_steps = 250
    c.log_every_steps = c.eval_every_steps = 250
    if arg == "quick":
        smoke(c, num_steps=20, probe_size=32, batch_size=16)
        c.model.channels, c.model.dense = (4, 8), (16,)
    return c
