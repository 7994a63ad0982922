r"""ReLU MLP 40-256-256-10 on MNIST-1D (embedded, offline), SGD + momentum, flips every step.

COMMAND:
  python -m regime_jax.main --config experiments/mlp_mnist1d.py --workdir runs/mlp_mnist1d
  (smoke test: --config experiments/mlp_mnist1d.py:quick, a few seconds)

EXPECTED (2 CPU cores): TBD
"""

from regime_jax.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.dataset.name = "mnist1d"
    c.model.hidden = (256, 256)
    c.num_steps = 3000
    if arg == "quick":
        c.num_steps, c.log_every_steps, c.eval_every_steps = 40, 10, 20
        c.record.snapshot_every_steps = 20
        c.probe.size = 64
    return c
