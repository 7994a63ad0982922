"""Exact integer counts beside every pattern rate, and rates that are exact quotients.

Counts are recounted in numpy (``np.unpackbits``); rates are compared bit for bit with
``np.float32(count / bits)`` as Python computes it, eagerly and under jit, for bit totals
below and above 2^24 and 2^31. Counts past 2^31 are exercised three ways: the 64-bit limb
sum on values whose true sum passes 2^32, a compile of a layer with more than 2^31 bits, and
the whole pipeline (device to ``metrics.jsonl``) with the limb threshold lowered so that a
tiny run takes the limb path.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import analyzer, bitmask, records
from regime_jax import gating as decouple
from regime_jax.bitmask import Packed
from regime_jax.run import fetch, loop

RNG = np.random.default_rng(20)
SHAPES = [(5, 13), (3, 4, 21), (7, 2, 3, 9), (2, 8)]  # [P, positions..., units]


def _dirty_packed(bits: np.ndarray, junk: int) -> np.ndarray:
    """Packed bits with the padding bits of the last byte set (they must never count)."""
    packed = np.packbits(bits, axis=-1, bitorder="little")
    units = bits.shape[-1]
    if units % 8:
        packed[..., -1] |= np.uint8((0xFF << units % 8) & 0xFF & junk)
    return packed


def _recount(packed: np.ndarray, units: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=units, bitorder="little").astype(bool)


def _as_int(count) -> int:
    return bitmask.count_int(jax.device_get(count))


def _same_f32(got, want) -> bool:
    return np.asarray(got, np.float32).view(np.uint32) == np.float32(want).view(np.uint32)


@pytest.fixture(params=["int32", "limbs"])
def form(request, monkeypatch):
    """Every count test runs twice: the ordinary int32 form, and the (hi, lo) limb form with
    the threshold lowered to 64 so small arrays take every limb path (trailing partial sums,
    a last axis cut into blocks, limb additions)."""
    if request.param == "limbs":
        monkeypatch.setattr(bitmask, "LIMB_BOUND", 64)
        jax.clear_caches()  # no trace made with the other threshold may be reused
    yield request.param
    if request.param == "limbs":
        jax.clear_caches()


def _patterns(seed: int, junk: int = 0xFF) -> tuple[dict, dict, dict, dict]:
    rng = np.random.default_rng(seed)
    b0 = {f"l{i}": rng.random(s) < 0.4 for i, s in enumerate(SHAPES)}
    b1 = {k: v ^ (rng.random(v.shape) < 0.3) for k, v in b0.items()}
    b1["l3"][:, 0] = True  # an always-on unit
    b1["l3"][:, 1] = False  # a dead unit
    p0 = {k: Packed(_dirty_packed(v, junk), v.shape[-1]) for k, v in b0.items()}
    p1 = {k: Packed(_dirty_packed(v, junk ^ 0x5A), v.shape[-1]) for k, v in b1.items()}
    return b0, b1, p0, p1


@pytest.mark.parametrize("jit", [False, True])
def test_counts_equal_a_numpy_recount_with_padding_bits_set(form, jit):
    b0, b1, p0, p1 = _patterns(1)
    fn = jax.jit(analyzer.pattern_metrics) if jit else analyzer.pattern_metrics
    metrics = jax.device_get(fn(p0, p1))
    if form == "limbs":  # the limb path really ran
        assert metrics["flip_count/all"].shape == (2,)
        assert metrics["flip_count/all"].dtype == np.uint32
    else:
        assert metrics["flip_count/all"].dtype == np.int32
    total = 0
    for k in b0:
        # numpy recount from the dirty packed bytes: unpackbits with count drops padding
        old, new = _recount(p0[k].bits, p0[k].units), _recount(p1[k].bits, p1[k].units)
        np.testing.assert_array_equal(new, b1[k])
        flips = int(np.count_nonzero(old != new))
        assert _as_int(metrics[f"flip_count/{k}"]) == flips
        assert _as_int(metrics[f"dead_count/{k}"]) == int(np.count_nonzero(~new.any(0)))
        assert _as_int(metrics[f"always_on_count/{k}"]) == int(np.count_nonzero(new.all(0)))
        assert _as_int(bitmask.popcount(p1[k].bits, p1[k].units)) == int(new.sum())
        total += flips
    assert _as_int(metrics["flip_count/all"]) == total
    assert _as_int(metrics["dead_count/l3"]) >= 1 and _as_int(metrics["always_on_count/l3"]) >= 1


@pytest.mark.parametrize("jit", [False, True])
def test_every_rate_is_the_python_quotient_of_its_count(form, jit):
    _, _, p0, p1 = _patterns(2)
    fn = jax.jit(analyzer.pattern_metrics) if jit else analyzer.pattern_metrics
    metrics = analyzer.counts_to_int(jax.device_get(fn(p0, p1)))
    den = analyzer.denominators(p1)
    assert set(den) == {k for k in metrics if "_count/" not in k}
    for key, bits in den.items():
        count = metrics[analyzer.count_key(key)]
        assert isinstance(count, int)
        assert _same_f32(metrics[key], count / bits), (key, count, bits)
    assert den["flip/all"] == sum(p.num_bits for p in p1.values())
    assert den["dead/l1"] == 4 * 21 and den["flip/l1"] == 3 * 4 * 21


def _rate_cases(rng, lo: int, hi: int, n: int) -> list[tuple[int, int]]:
    """(count, bits) pairs with bits in [lo, hi): random counts, the ends, and ties."""
    cases = []
    for bits in [int(b) for b in rng.integers(lo, hi, n, dtype=np.int64)]:
        cases += [(int(c), bits) for c in rng.integers(0, bits + 1, 40, dtype=np.int64)]
        cases += [(0, bits), (1, bits), (bits, bits), (bits - 1, bits), (bits // 3, bits)]
    return cases


def _nearest_f32(c: int, b: int) -> np.float32:
    """The float32 nearest the exact quotient ``c / b`` (ties to even), in integers."""
    if c == 0:
        return np.float32(0)
    e = 0
    while c << e < b:
        e += 1
    m, r = divmod(c << (23 + e), b)
    if 2 * r > b or (2 * r == b and m & 1):
        m += 1
    return np.float32(m * 2.0 ** (-23 - e))  # m <= 2^24: exact in float64 and float32


def _ties() -> list[tuple[int, int]]:
    """Quotients exactly halfway between two float32s (ties to even) and just beside them."""
    out = []
    for shift in (25, 30, 40, 62):
        bits = 1 << shift
        for m in (1, 2, 3, 0x7FFFFF, 0xFFFFFF):
            c = ((1 << 24) + m) << (shift - 25)  # 25 significant bits: the last one a half
            for d in (-1, 0, 1):
                if 0 < c + d <= bits:
                    out.append((c + d, bits))
    return out


# Bit ranges: each picks one way through ``rate`` (bits per integer division 24, 12, 8, 6, 4,
# 3 below 2^29; 64-bit limbs and a double rounding above), and "ties" sits on midpoints.
BANDS = [(1, 2**8), (2**8, 2**20), (2**20, 2**24), (2**24, 2**26), (2**26, 2**28)]
BANDS += [(2**28, 2**29), (2**29, 2**31), (2**31, 2**63), "ties"]


@pytest.mark.parametrize("band", BANDS, ids=str)
def test_rate_equals_np_float32_of_count_over_bits(band):
    cases = _ties() if band == "ties" else _rate_cases(RNG, *band, 25)
    counts = [c for c, _ in cases]
    bits = [b for _, b in cases]
    stacked = np.array([[c >> 32, c & 0xFFFFFFFF] for c in counts], np.uint32)
    want = np.array([np.float32(c / b) for c, b in cases], np.float32)
    eager = np.asarray(bitmask.rate(stacked, bits))
    jitted = np.asarray(jax.jit(lambda s: bitmask.rate(s, bits))(stacked))
    for got in (eager, jitted):
        bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
        assert not bad.size, [(counts[i], bits[i], got[i], want[i]) for i in bad[:5]]
    nearest = np.array([_nearest_f32(c, b) for c, b in cases], np.float32)
    single = np.array(bits) < bitmask.SINGLE_ROUNDING_BELOW  # there, Python's is the nearest
    np.testing.assert_array_equal(want[single].view(np.uint32), nearest[single].view(np.uint32))
    if band == "ties":  # the test can tell: Python's double rounding differs there
        assert np.any(want.view(np.uint32) != nearest.view(np.uint32))
    elif band[0] >= 2**24:  # the test can tell: a float32 division of rounded operands
        naive = np.float32(np.array(counts, np.float64)) / np.float32(np.array(bits, np.float64))
        assert np.any(naive.view(np.uint32) != want.view(np.uint32))
    if band != "ties" and band[1] <= 2**31:  # the int32 form too
        small = np.asarray(bitmask.rate(np.array(counts, np.int32), bits))
        np.testing.assert_array_equal(small.view(np.uint32), want.view(np.uint32))


def test_rate_follows_python_where_double_rounding_matters():
    """Above 2^29 bits Python's ``np.float32(c / b)`` rounds twice; the rate follows it."""
    bits = 2**62
    count = ((1 << 24) + 1 << 37) + 1  # just above the midpoint of 0.5 and its successor
    assert np.float32(count / bits) == np.float32(0.5)  # float64 lands on the midpoint
    assert _nearest_f32(count, bits) == np.nextafter(np.float32(0.5), np.float32(1))
    limb_pair = np.array([count >> 32, count & 0xFFFFFFFF], np.uint32)
    assert _same_f32(bitmask.rate(limb_pair, bits), count / bits)


def test_rate_of_a_scalar_count_under_jit_is_not_a_reciprocal_multiply():
    """``c / 12345`` under jit is ``c * fl(1/12345)``, 1 ulp off for many c; ``rate`` is not."""
    counts = np.arange(0, 12346, 7, dtype=np.int32)
    want = np.array([np.float32(int(c) / 12345) for c in counts])
    got = np.asarray(jax.jit(jax.vmap(lambda c: bitmask.rate(c, 12345)))(counts))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert _same_f32(bitmask.flip_rate(np.uint8([[1]]), np.uint8([[0]]), 3), 1 / 3)


def test_rate_refuses_bits_it_cannot_divide_by():
    for bits in (0, 2**63):
        with pytest.raises(ValueError, match=r"bits must lie in"):
            bitmask.rate(jnp.int32(0), bits)


def test_sum64_is_exact_past_2_to_the_32():
    values = RNG.integers(2**31, 2**32, size=(9, 7), dtype=np.uint64)
    values[0, 0] = 2**32 - 1
    want = int(sum(int(v) for v in values.ravel()))
    assert want > 2**35
    for fn in (bitmask.sum64, jax.jit(bitmask.sum64)):
        got = jax.device_get(fn(values.astype(np.uint32)))
        assert got.dtype == np.uint32 and got.shape == (2,)
        assert bitmask.count_int(got) == want
    assert bitmask.count_int(bitmask.sum64(np.uint32([2**32 - 1, 1]))) == 2**32


def test_add_counts_carries_between_limbs():
    a = np.array([1, 2**32 - 1], np.uint32)  # 2^33 - 1
    b = np.array([0, 1], np.uint32)
    c = np.int32(2**31 - 1)
    got = bitmask.add_counts([a, b, c], 2**40)
    assert bitmask.count_int(got) == 2**33 + 2**31 - 1
    assert int(bitmask.add_counts([np.int32(3), np.int32(4)], 100)) == 7


def test_a_layer_past_2_to_the_31_bits_counts_in_limbs():
    """Compile only: a [2^28 + 8, 1] packed layer of 8 units holds 2^31 + 64 bits."""
    big = jax.ShapeDtypeStruct((2**28 + 8, 1), jnp.uint8)
    cur = {"wide": Packed(big, 8)}
    assert cur["wide"].num_bits == 2**31 + 64
    shapes = jax.eval_shape(analyzer.pattern_metrics, cur, cur)
    assert shapes["flip_count/wide"].shape == (2,)
    assert shapes["flip_count/wide"].dtype == jnp.uint32
    assert shapes["flip_count/all"].shape == (2,)
    assert shapes["flip/wide"].shape == () and shapes["flip/wide"].dtype == jnp.float32
    assert shapes["dead_count/wide"].dtype == jnp.int32  # 8 sites: int32 suffices
    jax.jit(lambda a, b: bitmask.flip_count(a, b, 8)).lower(big, big).compile()


def test_count_int_and_counts_to_int():
    row = {
        "flip_count/fc1": np.array([3, 7], np.uint32),
        "dead_count/fc1": np.int32(5),
        "always_on_count/fc1": np.int32(0),
        "flip/fc1": np.float32(0.25),
    }
    out = analyzer.counts_to_int(row)
    assert out["flip_count/fc1"] == 3 * 2**32 + 7 and type(out["flip_count/fc1"]) is int
    assert out["dead_count/fc1"] == 5 and type(out["dead_count/fc1"]) is int
    assert out["flip/fc1"] is row["flip/fc1"] and list(out) == list(row)
    assert analyzer.count_key("always_on/block0/ffn/fc1") == "always_on_count/block0/ffn/fc1"
    with pytest.raises(ValueError, match="not a pattern rate key"):
        analyzer.count_key("step/abs/all")


def test_fetched_limb_counts_become_python_ints_in_rows():
    """A chunk's stacked limbs ``[T, 2]`` become one exact int per row."""
    stacked = np.array([[1, 0], [2, 2**32 - 1]], np.uint32)
    entry = fetch.Entry(
        rows=((5, 0, True), (6, 1, True)),
        metrics={"flip_count/all": stacked, "flip/all": np.float32([0.5, 0.25])},
    )
    rows = entry.expand()
    assert [r["flip_count/all"] for r in rows] == [2**32, 3 * 2**32 - 1]
    assert json.loads(records.to_json(rows[1]))["flip_count/all"] == 3 * 2**32 - 1


def test_disagreement_rates_are_exact_and_keys_unchanged():
    rng = np.random.default_rng(3)
    z_v = {"fc1": rng.normal(size=(7, 13)), "conv": rng.normal(size=(3, 5, 11))}
    z_g = {k: v + rng.normal(size=v.shape) for k, v in z_v.items()}
    z_v, z_g = jax.tree.map(jnp.float32, z_v), jax.tree.map(jnp.float32, z_g)
    metrics = jax.jit(decouple.disagreement_metrics)(z_v, z_g)
    assert set(metrics) == {f"decouple/disagree/{k}" for k in ("fc1", "conv", "all")}
    total_c = total_b = 0
    for k in z_v:
        c = int(np.count_nonzero((np.asarray(z_v[k]) > 0) != (np.asarray(z_g[k]) > 0)))
        b = z_v[k].size
        assert _same_f32(metrics[f"decouple/disagree/{k}"], c / b)
        total_c, total_b = total_c + c, total_b + b
    assert _same_f32(metrics["decouple/disagree/all"], total_c / total_b)


def test_metrics_jsonl_has_exact_int_counts_beside_exact_rates(tmp_path, monkeypatch):
    """The built-in loop (a chunk of 4 steps, every step recorded) writes every count as a
    JSON int and every rate as the float32 quotient; with the limb threshold lowered, the
    (hi, lo) pairs travel through the chunk's scan and the fetch and arrive as the same ints:
    the same bytes."""
    short = {"num_steps": 4, "steps_per_call": 4, "log_every_steps": 4, "eval_every_steps": 4}
    config = lambda: tiny_config(**short)
    loop.train_and_evaluate(config(), tmp_path / "int32")
    run = records.load_run(tmp_path / "int32")
    den = analyzer.denominators(run.masks(0))
    lines = (tmp_path / "int32" / records.METRICS).read_text().splitlines()
    flips = 0
    for row in map(json.loads, lines):
        for key, bits in den.items():
            if key not in row:
                assert key.startswith("flip/") and row["step"] == 0
                continue
            count = row[analyzer.count_key(key)]
            assert type(count) is int and 0 <= count <= bits
            assert _same_f32(row[key], count / bits), (row["step"], key)
            flips += key == "flip/all" and count
    assert flips > 0

    sums, sum64 = [], bitmask.sum64
    monkeypatch.setattr(bitmask, "sum64", lambda x: sums.append(x.shape) or sum64(x))
    monkeypatch.setattr(bitmask, "LIMB_BOUND", 64)
    jax.clear_caches()
    try:
        loop.train_and_evaluate(config(), tmp_path / "limbs")
    finally:
        jax.clear_caches()
    assert sums  # the limb path was traced
    assert (tmp_path / "limbs" / records.METRICS).read_text().splitlines() == lines


def test_a_chunked_monitor_of_more_than_2_to_the_31_bits_builds_and_compiles():
    """Compile only: 1025 probe sequences x 512 tokens x 4096 units (2^31 + 2^21 bits), the
    probe forward chunked; the counts are limbs, the rates float32."""
    import regime_jax as rj

    apply_fn = lambda p, x: jnp.maximum(x @ p["w"], 0.0).sum((-2, -1))
    params = {"w": jax.ShapeDtypeStruct((4, 4096), jnp.float32)}
    x = jax.ShapeDtypeStruct((1025, 512, 4), jnp.float32)
    monitor = rj.pattern_monitor(rj.capture_relus(apply_fn), jnp.zeros((1, 512, 4)))
    update = lambda s, p, x: monitor.update(s, p, p, probe_x=x)
    init = jax.jit(lambda p, x: rj.pattern_monitor(rj.capture_relus(apply_fn), x).init(p))
    state = jax.eval_shape(init, params, x)
    assert state.masks["w"].num_bits == 1025 * 512 * 4096 > 2**31
    metrics = jax.eval_shape(update, state, params, x)
    assert metrics[0]["flip_count/w"].shape == (2,) and metrics[0]["flip/w"].dtype == jnp.float32
    init.lower(params, x).compile()
    jax.jit(update).lower(state, params, x).compile()


def test_stability_counts_past_2_to_the_31_bits_build():
    """The stability test's flip counts (was: OverflowError on ``flips / total_bits``)."""
    from regime_jax import stability

    f = lambda p, x: (x, {"l": x @ p})
    cfg = stability.StabilityConfig(num_directions=2, num_radii=2)
    p = jax.ShapeDtypeStruct((4, 2**15), jnp.float32)
    x = jax.ShapeDtypeStruct((2**16 + 8, 4), jnp.float32)
    out = jax.eval_shape(lambda p, x: stability.perturb(f, p, x, jax.random.key(0), cfg), p, x)
    assert out["flip/all"].shape == (2,) and out["flip/all"].dtype == jnp.float32
    assert out["flip/l"].shape == (2,) and out["flip/l"].dtype == jnp.float32


@pytest.mark.parametrize("bound", [2**6, 2**10])
def test_stability_limb_path_runs_and_equals_the_int32_path(monkeypatch, bound):
    """With the limb threshold lowered, a small stability test takes the (hi, lo) path for
    real: the same flip rates (within float32 rounding of the division) as the int32 path."""
    from regime_jax import stability

    k = jax.random.split(jax.random.key(3), 2)
    params = {"w": jax.random.normal(k[0], (3, 9))}
    x = jax.random.normal(k[1], (11, 3))
    f = lambda p, x: (x @ p["w"], {"a": x @ p["w"], "b": (x @ p["w"])[:, :5]})
    cfg = stability.StabilityConfig(num_directions=3, num_radii=5, max_radius=3.0)
    ref = stability.perturb(f, params, x, jax.random.key(0), cfg)
    monkeypatch.setattr(bitmask, "LIMB_BOUND", bound)
    got = stability.perturb(f, params, x, jax.random.key(0), cfg)
    assert any(np.asarray(ref[k]).any() for k in ref if k.startswith("flip/"))
    for key in ("flip/all", "flip/a", "flip/b"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(ref[key]), rtol=2e-7)


def test_blocked_counts_in_limbs_equal_the_bits(monkeypatch):
    """Blocks of 2 examples (10 bytes) summed as (hi, lo) limbs (the limb threshold lowered
    to 2^7 bits): 9 examples x 40 bits, every one flipped / dead / always on."""
    monkeypatch.setattr(bitmask, "LIMB_BOUND", 2**7)
    monkeypatch.setattr(bitmask, "BLOCK_BYTES", 10)
    a = jnp.zeros((9, 5), jnp.uint8)
    b = jnp.full((9, 5), 0xFF, jnp.uint8)
    got = jax.jit(lambda a, b: bitmask.flip_count(a, b, 40))(a, b)
    assert got.shape == (2,) and bitmask.count_int(got) == 9 * 40
    assert bitmask.count_int(bitmask.dead(a, 40)) == 40
    assert bitmask.count_int(bitmask.always_on(b, 40)) == 40
