r"""ReLU MLP 64-128-128-10 on scikit-learn's 8x8 digits (embedded, offline), Adam, flips every step.

``mlp_mnist1d`` on the digits, with Adam.

COMMAND:
  python -m regime_jax.main --config mlp_digits --workdir runs/mlp_digits
  (smoke test: --config mlp_digits:quick)

EXPECTED (2 CPU cores): 19 s wall (2000 steps, every step recorded, probe 256); final
  eval/acc 0.986; flip/all ~3e-4 per step at the end.
"""

from regime_jax.configs import mlp_mnist1d
from regime_jax.configs.base import smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = mlp_mnist1d.get_config()
    c.dataset.name = "digits"
    c.dataset.seed = 0
    c.probe.size = 256
    c.model.hidden = (128, 128)
    c.optimizer.name, c.optimizer.learning_rate = "adam", 1e-3
    c.batch_size = 64
    c.num_steps = 2000
    if arg == "quick":
        smoke(c, num_steps=40, probe_size=64)
    return c
