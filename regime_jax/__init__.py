"""regime_jax: measure how ReLU networks train, on any JAX model, in any training loop.

The public API, in the style of optax: pure functions that return functions.

>>> import jax, jax.numpy as jnp, optax
>>> import regime_jax as rj
>>> def apply_fn(params, x):                       # any model: linen, NNX, plain JAX
...     return jnp.maximum(x @ params["w"], 0.0) @ params["v"]
>>> params = {"w": jnp.ones((3, 8)) / 3, "v": jnp.ones((8, 2))}
>>> probe_x = jax.random.normal(jax.random.key(0), (16, 3))
>>> preacts_fn = rj.capture_relus(apply_fn)      # finds every ReLU; no edit to the model
>>> monitor = rj.pattern_monitor(preacts_fn, probe_x)
>>> mstate = monitor.init(params)
>>> updates = jax.tree.map(lambda p: -0.01 * p, params)   # in your step: optax's updates
>>> metrics, mstate = monitor.update(mstate, optax.apply_updates(params, updates), updates)
>>> sorted(k for k in metrics if k.startswith("flip/"))
['flip/all', 'flip/w']

Shape suffixes. Array names in model, step and analysis code end in their shape, one letter
per axis joined by ``x`` (``logits_BxK``, nanodo's convention); the letters mean one thing each:

  ===  ==============================  ===  =====================================
  B    training / eval batch           K    classes (logits)
  P    probe examples (fixed set)      U    ReLU units of one layer (last axis)
  S    spatial positions (CNN)         Y    packed bytes per row, ``ceil(U / 8)``
  T    tokens (Transformer)            R    radii (stability test)
  I    input features (flattened)      V    random directions (stability test)
  C    conv channels                   D    model width (hidden features)
  F    FFN hidden width                1    a kept singleton axis
  ===  ==============================  ===  =====================================

The names load on first use (PEP 562), so ``import regime_jax`` imports no JAX: the command
line (``python -m regime_jax.main``) installs its signal handlers before anything heavy loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from regime_jax import _deprecations

_deprecations.install()  # old module paths (regime_jax.loop, ...) warn and still work

__version__ = "0.4.0"

# public name -> (module, attribute or None for the module itself)
_API = {
    "CaptureError": ("regime_jax.capture", "CaptureError"),
    "capture_relus": ("regime_jax.capture", "capture_relus"),
    "Site": ("regime_jax.capture", "Site"),
    "format_sites": ("regime_jax.capture", "format_sites"),
    "gate_relus": ("regime_jax.capture", "gate_relus"),
    "MonitorState": ("regime_jax.analyzer", "MonitorState"),
    "PatternMonitor": ("regime_jax.analyzer", "PatternMonitor"),
    "pattern_monitor": ("regime_jax.analyzer", "pattern_monitor"),
    "Net": ("regime_jax.models.adapt", "Net"),
    "nnx_apply": ("regime_jax.models.adapt", "nnx_apply"),
    "load_run": ("regime_jax.records", "load_run"),
    "bitmask": ("regime_jax.bitmask", None),
    "gating": ("regime_jax.gating", None),
    "stability": ("regime_jax.stability", None),
    "timescales": ("regime_jax.analysis.timescales", None),
}

__all__ = [
    "CaptureError",
    "MonitorState",
    "Net",
    "PatternMonitor",
    "Site",
    "__version__",
    "bitmask",
    "capture_relus",
    "format_sites",
    "gate_relus",
    "gating",
    "load_run",
    "nnx_apply",
    "pattern_monitor",
    "stability",
    "timescales",
]


def __getattr__(name: str) -> Any:
    if name == "decouple":  # rj.decouple before 0.4
        _deprecations.warn("regime_jax.decouple", "regime_jax.gating")
        return importlib.import_module("regime_jax.gating")
    if name not in _API:
        raise AttributeError(f"module 'regime_jax' has no attribute {name!r}")
    module, attr = _API[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


if TYPE_CHECKING:
    from regime_jax import bitmask, gating, stability
    from regime_jax.analysis import timescales
    from regime_jax.analyzer import MonitorState, PatternMonitor, pattern_monitor
    from regime_jax.capture import CaptureError, Site, capture_relus, format_sites, gate_relus
    from regime_jax.models.adapt import Net, nnx_apply
    from regime_jax.records import load_run
