r"""Benchmark (not a test): how much memory does monitoring need? Compile only, any backend.

COMMAND:
  python experiments/bench_memory.py                       # gpt at P = 128 .. 1024
  python experiments/bench_memory.py --models gpt mlp cnn transformer --probe 64 512
  python experiments/bench_memory.py --models resnet --probe 512     # a registered model
  python experiments/bench_memory.py --probe 512 --chunks 2 4 8 16 32 64   # per probe_chunk N

For each model and probe size P, XLA's compiled memory analysis (``jax.jit(f).lower(...)
.compile().memory_analysis()``: temporary, argument and output bytes) of
  plain       the train step alone (loss, grads, optax update);
  +probe      the train step plus a bare forward pass of the probe set;
  mon/one     regime_jax's recording step, the probe forward in one pass (probe_chunk=None);
  mon/auto    the recording step with the default probe_chunk="auto";
and the bytes of one set of packed masks. ``extra`` is (temp + output) of the variant minus the
plain step's: what monitoring adds beyond the training step (its arguments add the masks
carried in the state). Nothing runs: the figures come from compiling abstract shapes, so a
probe of 2^31+ bits compiles on a laptop.

Models: ``gpt`` (defined here: a GPT-style causal decoder, 256 tokens, d_model 512, 8 heads,
ReLU FFN 4096, 2 layers, vocabulary 256, next-token loss, batch 8) unless the registry has a
model of that name; any other name is built with ``regime_jax.models.create_model`` from the
packaged config of that name if there is one (``cnn_cifar10``), else ``{"name": NAME}`` with
the fields in ``DEFAULTS`` below (extend it for a model added with ``register_model``).

EXPECTED (CPU): gpt at P=512: mon/auto extra <= 2 x masks + 256 MiB; P=1024 (2^31 bits)
compiles. The figures measured are in docs/guide/scale.md ("Memory").
"""

from __future__ import annotations

import argparse
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from regime_jax import analyzer, configs, models
from regime_jax.models.adapt import as_net
from regime_jax.models.record import relu
from regime_jax.run import step

MIB = 2**20
# Fields and input shapes of models built by name (with --models); None: the packaged config.
DEFAULTS = {
    "mlp": ({"name": "mlp", "hidden": (256, 256)}, (784,), 10),
    "cnn": (None, (32, 32, 3), 10),  # cnn_cifar10's model
    "transformer": (None, (32, 32, 3), 10),  # vit_cifar10's model
    "resnet": (None, (32, 32, 3), 10),  # resnet18_cifar10's model
}
PACKAGED = {"cnn": "cnn_cifar10", "transformer": "vit_cifar10", "resnet": "resnet18_cifar10"}


class Block(nn.Module):
    """Pre-LN causal decoder block; the FFN's ReLU is recorded as ``block{i}/fc1``."""

    dim: int
    heads: int
    ffn: int

    @nn.compact
    def __call__(self, x_BxTxD):
        y = nn.LayerNorm(name="ln1")(x_BxTxD)
        mask = nn.make_causal_mask(jnp.ones(x_BxTxD.shape[:2], jnp.int32))
        attn = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")
        x_BxTxD = x_BxTxD + attn(y, y, mask=mask)
        y = nn.LayerNorm(name="ln2")(x_BxTxD)
        fc1 = nn.Dense(self.ffn, name="fc1")
        return x_BxTxD + nn.Dense(self.dim, name="fc2")(relu(fc1, fc1(y)))


class GPT(nn.Module):
    """GPT-style decoder: token + learned position embeddings, causal blocks, LM head."""

    vocab: int = 256
    tokens: int = 256
    dim: int = 512
    heads: int = 8
    ffn: int = 4096
    layers: int = 2

    @nn.compact
    def __call__(self, ids_BxT):
        pos = self.param("pos", nn.initializers.normal(0.02), (self.tokens, self.dim))
        x = nn.Embed(self.vocab, self.dim, name="embed")(ids_BxT) + pos
        for i in range(self.layers):
            x = Block(self.dim, self.heads, self.ffn, name=f"block{i}")(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


def build(name: str):
    """``(model, x ShapeDtypeStruct per example, y per example)`` for a model name."""
    if (
        name == "gpt"
    ):  # this file's decoder (the figures of docs/guide/scale.md), not the registry's
        g = GPT()
        ids = jax.ShapeDtypeStruct((g.tokens,), jnp.int32)
        return g, ids, jax.ShapeDtypeStruct((g.tokens,), jnp.int32)
    cfg, x_shape, classes = DEFAULTS.get(name, ({"name": name}, (32, 32, 3), 10))
    if cfg is None:
        cfg = configs.load(PACKAGED[name]).model
    model = models.create_model(cfg, classes)
    return model, jax.ShapeDtypeStruct(x_shape, jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)


def _stack(n: int, s: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((n, *s.shape), s.dtype)


def _plain_step(state, batch, probe, *, model, tx, forward_probe):
    net = as_net(model)

    def apply(params, x):  # a model with a train mode (BatchNorm): eval mode, its variables
        if net.modes is not None:
            params = net.modes.join(params, state.model_state.variables)
        return net.apply(params, x)

    def loss_fn(params):
        return step.cross_entropy(apply(params, batch["x"]), batch["y"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {"train/loss": loss}
    if forward_probe:  # reduced so XLA cannot drop it
        out["probe"] = sum(jnp.sum(v) for v in jax.tree.leaves(apply(params, probe["x"])))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


def memory(fn, *args) -> dict[str, int]:
    m = jax.jit(fn, donate_argnums=0).lower(*args).compile().memory_analysis()
    return {
        "temp": m.temp_size_in_bytes,
        "arg": m.argument_size_in_bytes,
        "out": m.output_size_in_bytes,
    }


def measure(name: str, num: int, batch_size: int) -> dict:
    model, x1, y1 = build(name)
    tx = optax.adam(1e-3)
    batch = {"x": _stack(batch_size, x1), "y": _stack(batch_size, y1)}
    probe = {"x": _stack(num, x1)}
    zeros = jnp.zeros(probe["x"].shape, probe["x"].dtype)  # abstract below: never computed
    out = {}
    for label, chunk in (("mon/one", None), ("mon/auto", "auto")):
        options = step.MonitorOptions(probe_chunk=chunk)
        init = functools.partial(step.create_train_state, model, tx, monitor_options=options)
        state = jax.eval_shape(lambda k, init=init: init(k, zeros), jax.random.key(0))
        fn = functools.partial(
            step.train_step, model=model, tx=tx, record=True, monitor_options=options
        )
        out[label] = memory(fn, state, batch, probe)
    for label, fwd in (("plain", False), ("+probe", True)):
        fn = functools.partial(_plain_step, model=model, tx=tx, forward_probe=fwd)
        out[label] = memory(fn, state, batch, probe)
    masks = jax.tree.leaves(state.monitor.masks)
    out["masks"] = sum(math.prod(a.shape) for a in masks)
    out["bits"] = sum(p.num_bits for p in state.monitor.masks.values())
    return out


def sweep_chunks(args) -> None:
    """The monitored step's extra memory for each ``probe_chunk`` N (how the default was
    chosen): per model and P, N, one chunk's pre-activation bytes and the extra."""
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, batch {args.batch}; MiB")
    print("model        P      N  chunk preacts | mon extra")
    for name in args.models:
        for num in args.probe:
            for size, preacts, extra in chunk_rows(name, num, args.chunks, args.batch):
                print(f"{name:10s} {num:5d} {size:6d} {preacts / MIB:13.1f} | {extra / MIB:9.1f}")


def chunk_rows(name: str, num: int, chunks: list[int], batch_size: int) -> list[tuple]:
    """``(examples per chunk, their pre-activation bytes, extra bytes)`` for each N."""
    model, x1, y1 = build(name)
    tx, net = optax.adam(1e-3), as_net(model)
    batch = {"x": _stack(batch_size, x1), "y": _stack(batch_size, y1)}
    probe = {"x": _stack(num, x1)}
    params = jax.eval_shape(net.init, jax.random.key(0), _stack(1, x1))
    z = jax.eval_shape(lambda p, x: net.preacts_fn(p, x)[1], params, _stack(1, x1))
    per_example = sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in z.values())
    rows, base = [], None
    for chunk in chunks:
        options = step.MonitorOptions(probe_chunk=chunk)
        init = functools.partial(step.create_train_state, model, tx, monitor_options=options)
        state = jax.eval_shape(init, jax.random.key(0), probe["x"])
        if base is None:
            fn = functools.partial(_plain_step, model=model, tx=tx, forward_probe=False)
            m = memory(fn, state, batch, probe)
            base = m["temp"] + m["out"]
        fn = functools.partial(
            step.train_step, model=model, tx=tx, record=True, monitor_options=options
        )
        m = memory(fn, state, batch, probe)
        size = analyzer.probe_chunk_size(per_example, num, chunk)
        rows.append((size, size * per_example, m["temp"] + m["out"] - base))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["gpt"])
    p.add_argument("--probe", nargs="+", type=int, default=[128, 256, 512, 1024])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--chunks", nargs="*", type=int, default=[], help="also: the extra memory of each N"
    )
    args = p.parse_args()
    if args.chunks:
        return sweep_chunks(args)
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, batch {args.batch}; MiB")
    head = "model        P    bits  masks |  plain temp/arg |  +probe extra | mon/one extra"
    print(head + " | mon/auto extra | bar (2 masks + 256)")
    for name in args.models:
        for num in args.probe:
            r = measure(name, num, args.batch)
            base = r["plain"]["temp"] + r["plain"]["out"]
            extra = {
                k: (r[k]["temp"] + r[k]["out"] - base) / MIB
                for k in ("+probe", "mon/one", "mon/auto")
            }
            bar = (2 * r["masks"] + 256 * MIB) / MIB
            print(
                f"{name:10s} {num:5d} 2^{math.log2(r['bits']):4.1f} {r['masks'] / MIB:6.1f} | "
                f"{r['plain']['temp'] / MIB:7.1f}/{r['plain']['arg'] / MIB:6.1f} | "
                f"{extra['+probe']:12.1f} | {extra['mon/one']:13.1f} | {extra['mon/auto']:14.1f}"
                f" | {bar:7.1f} {'ok' if extra['mon/auto'] <= bar else 'OVER'}"
            )


if __name__ == "__main__":
    main()
