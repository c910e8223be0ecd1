"""Tests for edmkit.training.ema: power-function EMA and post-hoc reconstruction (EDM2 Sec. 3, App. C)."""

import io

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from edmkit.training.ema import (
    STD_MAX,
    PowerFunctionEMA,
    exp_to_std,
    power_function_beta,
    power_function_inner,
    reconstruct,
    solve_posthoc_coefficients,
    std_to_exp,
)


class _Tiny(torch.nn.Module):
    """Parameters plus a float buffer, a float16 buffer and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("fp16", torch.zeros(2, dtype=torch.float16))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def _perturb(net: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for v in net.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=gen).to(v.dtype))
            else:
                v.add_(1)


def _snapshot_list(times, stds, tensors):
    """(nimg, std, loader) triples over a list of state dicts."""
    return [(t, s, (lambda d=d: d)) for t, s, d in zip(times, stds, tensors)]


# 1 ------------------------------------------------------------------------------------------
def test_std_exp_round_trip_known_pairs_and_range():
    stds = np.concatenate([np.geomspace(1e-3, STD_MAX, 60), [STD_MAX]])
    gammas = std_to_exp(stds)
    np.testing.assert_allclose(exp_to_std(gammas), stds, rtol=1e-12, atol=0)
    for s in stds[::7]:  # scalar path agrees with the array path and returns a float
        assert isinstance(std_to_exp(float(s)), float)
        assert abs(exp_to_std(std_to_exp(float(s))) - s) <= 1e-12 * s
    # The root really solves the cubic of PAPERS.md.
    cubic = stds**2 * (gammas + 2) ** 2 * (gammas + 3) - (gammas + 1)
    np.testing.assert_allclose(cubic / (gammas + 1), 0, atol=1e-10)
    assert abs(std_to_exp(0.05) - 16.97) < 0.01
    assert abs(std_to_exp(0.10) - 6.94) < 0.01
    # Valid range: decreasing on gamma >= 0, maximum sqrt(1/12) at gamma = 0.
    grid = np.linspace(0, 200, 2001)
    assert np.all(np.diff(exp_to_std(grid)) < 0)
    assert exp_to_std(0.0) == pytest.approx(np.sqrt(1 / 12), rel=1e-15)
    assert std_to_exp(STD_MAX) == 0.0
    for bad in [0.0, -0.05, STD_MAX * (1 + 1e-9), 0.3, float("nan"), float("inf")]:
        with pytest.raises(ValueError):
            std_to_exp(bad)
    with pytest.raises(ValueError):
        std_to_exp(np.array([0.05, 0.5]))
    with pytest.raises(ValueError):
        exp_to_std(-0.5)


def test_inner_product_matches_quadrature():
    def profile(tau, t, g):
        return (g + 1) * tau**g / t ** (g + 1) if tau <= t else 0.0

    for t_a, g_a, t_b, g_b in [(1.0, 6.94, 0.6, 16.97), (0.3, 0.0, 0.9, 3.5), (2.0, 16.97, 2.0, 16.97)]:
        ref = quad(lambda u: profile(u, t_a, g_a) * profile(u, t_b, g_b), 0, min(t_a, t_b),
                   epsabs=0, epsrel=1e-12)[0]
        assert power_function_inner(t_a, g_a, t_b, g_b) == pytest.approx(ref, rel=1e-9)
    # Large times and exponents must not overflow; the inner product scales as 1/t.
    big = power_function_inner(2e9, 16.97, 1e9, 6.94)
    assert np.isfinite(big) and big == pytest.approx(power_function_inner(2.0, 16.97, 1.0, 6.94) / 1e9)


# 2 ------------------------------------------------------------------------------------------
def test_coefficients_sum_to_one():
    g05, g10 = std_to_exp(0.05), std_to_exp(0.10)
    # Sparse snapshots: 4 per EMA. Plain least squares (EDM2) then misses sum 1 by > 1e-3, i.e.
    # its reconstructed profile does not integrate to 1; the constrained default fixes it.
    ts = np.arange(1, 5) * 1000
    t_in, s_in = np.concatenate([ts, ts]), np.repeat([0.05, 0.10], 4)
    out_std = np.array([0.02, 0.07, 0.15])
    x = solve_posthoc_coefficients(t_in, s_in, 4000, out_std)  # [8, 3]
    assert x.shape == (8, 3) and x.dtype == np.float64
    np.testing.assert_allclose(x.sum(axis=0), 1.0, atol=1e-6)
    x_plain = solve_posthoc_coefficients(t_in, s_in, 4000, out_std, sum_to_one=False)
    assert np.all(np.abs(x_plain.sum(axis=0) - 1) > 1e-3)
    # The constrained profile still fits almost as well as the unconstrained one (L2 residual).
    for j, std in enumerate(out_std):
        g_in, g_r = np.where(s_in == 0.05, g05, g10), std_to_exp(std)
        A = power_function_inner(t_in[:, None], g_in[:, None], t_in[None], g_in[None])
        b = power_function_inner(t_in, g_in, 4000, g_r)
        c = power_function_inner(4000, g_r, 4000, g_r)
        res = [c - 2 * v @ b + v @ A @ v for v in (x[:, j], x_plain[:, j])]
        assert res[0] >= res[1] - 1e-12 * c and res[0] <= 1.5 * res[1]
    # Dense snapshots (64 per EMA): even the plain solve sums to 1 within 1e-6.
    ts = np.arange(1, 65) * 1000
    x_dense = solve_posthoc_coefficients(np.concatenate([ts, ts]), np.repeat([0.05, 0.10], 64),
                                         64000, 0.07, sum_to_one=False)
    assert abs(x_dense.sum() - 1) < 1e-6
    # What the sum means for weights: a parameter that never changed comes back unchanged.
    const = {"w": torch.full((5,), 3.25)}
    # Bit-exact: the sum is accumulated in float64 (gain sum|x_i| ~ 5 here; float32 accumulation is off by ~1 ulp).
    out, info = reconstruct(_snapshot_list(t_in, s_in, [const] * 8), out_nimg=4000, out_std=0.02)
    assert torch.equal(out["w"], const["w"])


# 3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", [5, 19, 27, 39])  # middle and last of each EMA
def test_tracked_profile_is_reproduced_exactly(which):
    gen = torch.Generator().manual_seed(1)
    ts = np.arange(1, 21) * 512
    t_in, s_in = np.concatenate([ts, ts]), np.repeat([0.05, 0.10], 20)
    states = [{"w": torch.randn(4, 3, generator=gen), "n": torch.tensor(i)} for i in range(40)]
    out, info = reconstruct(_snapshot_list(t_in, s_in, states), out_nimg=int(t_in[which]),
                            out_std=float(s_in[which]))
    expected_x = np.zeros(40)
    expected_x[which] = 1.0
    np.testing.assert_allclose(info["coefficients"], expected_x, atol=1e-7)
    assert out["w"].dtype == torch.float32 and out["n"].dtype == torch.int64  # non-float entries keep their dtype
    assert torch.allclose(out["w"], states[which]["w"], rtol=1e-6, atol=1e-6)
    # Non-float entries come from the latest snapshot at or before out_nimg.
    latest = max((i for i in range(40) if t_in[i] <= t_in[which]), key=lambda i: (t_in[i], i))
    assert int(out["n"]) == latest
    assert info["used"] == int(np.sum(t_in <= t_in[which])) and info["cond"] >= 1


# 4 ------------------------------------------------------------------------------------------
def test_untracked_profile_matches_direct_ema_on_random_walk():
    steps, batch, every = 1000, 4, 25
    net = torch.nn.Module()
    net.w = torch.nn.Parameter(torch.zeros(64))
    tracked = PowerFunctionEMA(net, stds=(0.05, 0.10))
    direct = PowerFunctionEMA(net, stds=(0.07,))
    gen = torch.Generator().manual_seed(0)
    snapshots = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            net.w.add_(torch.randn(64, generator=gen))  # random walk
        tracked.update(cur_nimg=step * batch, batch_nimg=batch)
        direct.update(cur_nimg=step * batch, batch_nimg=batch)
        if step % every == 0:
            for i, std in enumerate(tracked.stds):
                state = tracked.averaged(i)
                snapshots.append((step * batch, std, lambda s=state: s))
    out, info = reconstruct(snapshots, out_nimg=steps * batch, out_std=0.07)
    recon, want = out["w"].double(), direct.averaged(0)["w"].double()
    ema05, ema10 = tracked.averaged(0)["w"].double(), tracked.averaged(1)["w"].double()
    # Scale: the spread between the two tracked EMAs, i.e. the size of the effect post-hoc EMA
    # must resolve. It ignores any common offset of the walk (which would make ||direct|| a
    # flattering denominator), and naive guesses score badly on it: the midpoint of the two
    # tracked EMAs is off by ~0.1 of it, so 2e-3 demands a genuine reconstruction.
    scale = torch.linalg.vector_norm(ema05 - ema10)
    err = torch.linalg.vector_norm(recon - want) / scale
    naive = torch.linalg.vector_norm((ema05 + ema10) / 2 - want) / scale
    assert naive > 0.05
    assert err < 2e-3, f"relative error {err:.2e}"  # ~6e-5 here; ~5e-4 with every=50
    assert info["used"] == len(snapshots)


# 5 ------------------------------------------------------------------------------------------
def test_earlier_out_nimg_ignores_later_snapshots():
    gen = torch.Generator().manual_seed(2)
    ts = np.arange(1, 11) * 100
    t_in, s_in = np.concatenate([ts, ts]), np.repeat([0.05, 0.10], 10)
    states = [{"w": torch.randn(6, generator=gen)} for _ in range(20)]
    out_nimg = 550  # between snapshots 5 and 6
    late = t_in > out_nimg
    x = solve_posthoc_coefficients(t_in, s_in, out_nimg, 0.08)[:, 0]
    assert np.all(x[late] == 0) and np.all(x[~late] != 0)

    calls = []

    def loader(i, perturbed):
        def load():
            calls.append(i)
            return {"w": states[i]["w"] + (100.0 if perturbed and late[i] else 0.0)}
        return load

    results = []
    for perturbed in (False, True):
        snaps = [(int(t), float(s), loader(i, perturbed)) for i, (t, s) in enumerate(zip(t_in, s_in))]
        out, info = reconstruct(snaps, out_nimg=out_nimg, out_std=0.08)
        results.append(out["w"])
        np.testing.assert_array_equal(info["coefficients"], x)
    assert torch.equal(results[0], results[1])
    assert not any(late[i] for i in calls)  # later snapshots are never even loaded
    # The answer does depend on the earlier snapshots (the test above is not vacuous).
    states[0]["w"] += 1.0
    snaps = _snapshot_list(t_in, s_in, states)
    assert not torch.equal(reconstruct(snaps, out_nimg=out_nimg, out_std=0.08)[0]["w"], results[0])


def test_reconstruct_rejects_bad_input():
    a = {"w": torch.zeros(3)}
    snaps = [(100, 0.05, lambda: a), (200, 0.10, lambda: a)]
    with pytest.raises(ValueError):
        reconstruct([], out_nimg=100, out_std=0.05)
    for bad_std in (0.0, -0.1, 0.29):
        with pytest.raises(ValueError):
            reconstruct(snaps, out_nimg=200, out_std=bad_std)
    with pytest.raises(ValueError):
        reconstruct(snaps, out_nimg=99, out_std=0.05)
    with pytest.raises(ValueError):
        reconstruct(snaps + [(300, 0.05, lambda: {"w": torch.zeros(4)})], out_nimg=300, out_std=0.07)
    with pytest.raises(ValueError, match="snapshot at nimg=300"):
        reconstruct(snaps + [(300, 0.05, lambda: {"v": torch.zeros(3)})], out_nimg=300, out_std=0.07)


def test_domain_checks_and_the_single_snapshot_case():
    """Each argument is validated on its own (times > 0, exponents >= 0, batch > 0), and one snapshot at or before
    out_nimg is a valid (if poor) basis: its weight is 1 (the sum constraint)."""
    for kw in (dict(gamma=1.0, cur_nimg=4, batch_nimg=0), dict(gamma=-0.5, cur_nimg=4, batch_nimg=1),
               dict(gamma=float("inf"), cur_nimg=4, batch_nimg=1), dict(gamma=float("nan"), cur_nimg=4, batch_nimg=1)):
        with pytest.raises(ValueError):
            power_function_beta(**kw)
    for args in ((0.0, 1.0, 1.0, 1.0), (1.0, 1.0, 0.0, 1.0), (1.0, -0.5, 1.0, 1.0), (1.0, 1.0, 1.0, -0.5)):
        with pytest.raises(ValueError):
            power_function_inner(*args)
    assert power_function_inner(1.0, 0.0, 1.0, 0.0) == 1.0  # γ = 0: p = 1 on [0, 1], <p, p> = 1
    with pytest.raises(ValueError, match="no snapshots"):
        solve_posthoc_coefficients([], 0.05, 100, 0.05)
    with pytest.raises(ValueError, match="> 0"):
        solve_posthoc_coefficients([0, 100], 0.05, 100, 0.05)
    np.testing.assert_allclose(solve_posthoc_coefficients([100, 300], [0.05, 0.10], 200, 0.07), [[1.0], [0.0]], rtol=1e-12, atol=0)
    assert isinstance(exp_to_std(1.0), float) and exp_to_std(np.array([1.0])).shape == (1,)
    net = _Tiny()
    ema = PowerFunctionEMA(net, stds=(0.05,))
    state = ema.state_dict()
    state["emas"][0] = {k: v.double() if k == "scale" else v for k, v in state["emas"][0].items()}  # same shape, other dtype
    with pytest.raises(ValueError, match="'scale'"):
        ema.load_state_dict(state)


# 6 ------------------------------------------------------------------------------------------
def test_state_dict_round_trip_and_bit_exact_resume():
    torch.manual_seed(0)
    net = _Tiny()
    gen = torch.Generator().manual_seed(3)
    trajectory = []
    for _ in range(12):
        _perturb(net, gen)
        trajectory.append({k: v.clone() for k, v in net.state_dict().items()})

    def run(ema, steps):
        for k in steps:
            net.load_state_dict(trajectory[k])
            ema.update(cur_nimg=(k + 1) * 8, batch_nimg=8)

    net.load_state_dict(trajectory[0])
    uninterrupted = PowerFunctionEMA(net, stds=(0.05, 0.10, 0.2))
    run(uninterrupted, range(12))

    net.load_state_dict(trajectory[0])
    first = PowerFunctionEMA(net, stds=(0.05, 0.10, 0.2))
    run(first, range(5))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for a, b in zip(first.state_dict()["emas"], loaded["emas"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)

    fresh_net = _Tiny()  # different initial weights: everything must come from the state dict
    net.load_state_dict(fresh_net.state_dict())
    resumed = PowerFunctionEMA(net, stds=(0.05, 0.10, 0.2))
    resumed.load_state_dict(loaded)
    run(resumed, range(5, 12))
    for i in range(3):
        a, b = uninterrupted.averaged(i), resumed.averaged(i)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError):
        PowerFunctionEMA(net, stds=(0.05,)).load_state_dict(loaded)


def test_averaged_state_dict_dtypes_and_strict_load():
    net = _Tiny()
    ema = PowerFunctionEMA(net)
    assert ema.stds == (0.05, 0.10)
    gen = torch.Generator().manual_seed(4)
    gamma = std_to_exp(0.10)
    expected = None
    for k in range(1, 4):
        _perturb(net, gen)
        ema.update(cur_nimg=k, batch_nimg=1)
        beta = (1 - 1 / k) ** (gamma + 1)  # 0 on the first update: the initial weights are discarded
        value = net.lin.weight.detach().double()
        expected = value if expected is None else beta * expected + (1 - beta) * value
    avg = ema.averaged(1)
    for k, v in net.state_dict().items():
        assert avg[k].dtype == v.dtype and avg[k].shape == v.shape
    assert int(avg["count"]) == 3  # non-float buffer follows the net
    torch.testing.assert_close(avg["lin.weight"].double(), expected, rtol=1e-6, atol=1e-6)  # float entries are averaged
    assert not torch.allclose(avg["lin.weight"], net.lin.weight, atol=1e-3)
    avg["lin.weight"].add_(1.0)  # returned tensors are copies, not the EMA's storage
    assert not torch.equal(avg["lin.weight"], ema.averaged(1)["lin.weight"])
    _Tiny().load_state_dict(ema.averaged(0), strict=True)
    with pytest.raises(ValueError):
        ema.averaged(2)
    with pytest.raises(ValueError):
        PowerFunctionEMA(net, stds=(0.5,))


# 7 ------------------------------------------------------------------------------------------
def test_update_matches_hand_computed_beta():
    assert power_function_beta(gamma=1.0, cur_nimg=4, batch_nimg=1) == 0.5625  # (3/4)^2
    assert power_function_beta(gamma=0.0, cur_nimg=3, batch_nimg=3) == 0.0
    with pytest.raises(ValueError):
        power_function_beta(gamma=1.0, cur_nimg=2, batch_nimg=4)

    net = torch.nn.Module()
    net.p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = PowerFunctionEMA(net, stds=(0.05, 0.10))
    values, batch = [1.5, -0.25, 2.0], 4
    expected = [0.0, 0.0]
    for step, value in enumerate(values, start=1):
        with torch.no_grad():
            net.p.fill_(value)
        ema.update(cur_nimg=step * batch, batch_nimg=batch)
        for i, gamma in enumerate((16.972198602303454, 6.937203937601812)):  # std_to_exp(0.05/0.10)
            beta = ((step - 1) / step) ** (gamma + 1)  # (1 - batch/t)^(gamma+1), t = step*batch
            expected[i] = beta * expected[i] + (1 - beta) * value
            assert ema.averaged(i)["p"].item() == pytest.approx(expected[i], rel=1e-6, abs=1e-7)
    assert ema.averaged(0)["p"].item() != pytest.approx(ema.averaged(1)["p"].item(), rel=1e-3)


def test_ema_of_a_float16_entry_is_kept_in_float32():
    """σ_rel = STD_MAX is γ = 0, the running mean. The mean of 1 and 1 + 2⁻¹⁰ (adjacent float16 values) is
    1 + 2⁻¹¹, which float16 cannot hold: the tracked copy must be float32 (module docstring), not the net's dtype."""
    net = _Tiny()
    ema = PowerFunctionEMA(net, stds=(STD_MAX,))
    for k, value in enumerate([1.0, 1.0 + 2**-10], start=1):
        net.fp16.fill_(value)
        ema.update(cur_nimg=k, batch_nimg=1)
    tracked = ema.state_dict()["emas"][0]
    assert tracked["fp16"].dtype == torch.float32 and tracked["fp16"].tolist() == [1.0 + 2**-11] * 2
    assert tracked["count"].dtype == torch.int64  # non-float buffers are held as they are


def test_reported_condition_number_is_that_of_the_profile_gram_matrix():
    """info["cond"] = cond(A), A_ij = <p_i, p_j> of the used snapshots' profiles, here built by quadrature of the
    profiles (γ from σ_rel, not σ_rel itself); the snapshot after out_nimg is not part of it."""
    def profile(tau, t, g):
        return (g + 1) * tau**g / t ** (g + 1) if tau <= t else 0.0

    times, stds = [400, 1000, 1000, 1200], [0.05, 0.05, 0.10, 0.10]
    gammas = [std_to_exp(s) for s in stds[:3]]
    A = np.array([[quad(lambda u: profile(u, ti, gi) * profile(u, tj, gj), 0, min(ti, tj), epsabs=0, epsrel=1e-12)[0]
                   for tj, gj in zip(times[:3], gammas)] for ti, gi in zip(times[:3], gammas)])
    state = {"w": torch.zeros(2)}
    _, info = reconstruct(_snapshot_list(times, stds, [state] * 4), out_nimg=1000, out_std=0.07)
    assert info["used"] == 3
    assert info["cond"] == pytest.approx(np.linalg.cond(A), rel=1e-6)
