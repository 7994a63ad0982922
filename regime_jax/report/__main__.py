"""``python -m regime_jax.report``: a sweep's report or one run's figures."""

from regime_jax.report import main

main()
