r"""The local-stability test during training: MLP 40-256-256-10 on MNIST-1D.

At step 0, the last step and 12 log-spaced steps between, parameters are perturbed along 16
random unit directions at 12 log-spaced radii (1e-6 .. 1); ``stability/kept@<r>`` is the fraction
of (direction, example) pairs whose whole pattern is unchanged, ``stability/radius_q50`` the
median empirical stability radius, ``stability/first_order_q50`` the analytic one.

``mlp_mnist1d`` (its ``:quick`` too) with the probe on: :func:`with_probe`, which
``stability_cnn_digits`` reuses.

COMMAND:
  python -m regime_jax.main --config stability_mlp_mnist1d --workdir runs/stability_mlp_mnist1d
  python -m regime_jax.report --run runs/stability_mlp_mnist1d   # figures in <run>/figures
  (smoke test: --config stability_mlp_mnist1d:quick)

EXPECTED (2 CPU cores): 49 s wall. At init every pattern is kept up to eps ~4e-5 along
  random unit directions (kept@1e-06..4e-05 = 1.0), 0.82 at 2e-02, 0.13 at 0.3; after
  training 0.91 at 2e-02, 0.32 at 0.3: the median stability radius grows from 0.023 to 0.053.
  The first-order radius |z|/|Ju| lies inside the empirical bracket for ~99% of
  (direction, example) pairs.
"""

from regime_jax.configs import mlp_mnist1d
from regime_jax.configs.base import variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    return with_probe(mlp_mnist1d.get_config(arg), arg)


def with_probe(c, arg: str | None):
    """``c`` with the stability test at 14 steps (``arg="quick"``: a small probe at 5)."""
    c.stability.num_points = 12
    c.stability.num_examples = min(256, c.probe.size)
    c.stability.refine = 2  # finer breaking radii for the first-order cross-check
    if arg == "quick":
        c.stability.num_examples, c.stability.num_points = 32, 3
        c.stability.num_directions, c.stability.num_radii, c.stability.refine = 4, 6, 0
    return c
