"""Power-function EMA and post-hoc EMA reconstruction (EDM2 Sec. 3 and App. C).

Implemented from the paper (Karras et al., "Analyzing and Improving the Training Dynamics of
Diffusion Models", arXiv 2312.02696); no code from NVlabs/edm2 is used.

Symbols (time is always measured in training images seen, "nimg", never in optimizer steps):
    t        time of an average: images seen when it was taken.
    tau      integration variable over the training history, tau in [0, t].
    gamma    exponent of the power-function profile p_{gamma,t}(tau) = (gamma+1) tau^gamma / t^(gamma+1)
             on [0, t], zero after t; it integrates to 1.
    sigma_rel (`std`) relative standard deviation of that profile (its std divided by t),
             EDM2's "EMA length". sigma_rel 0.05 <-> gamma ~ 16.97, 0.10 <-> gamma ~ 6.94.
    beta     per-update decay of the running average.

Valid range. exp_to_std is not monotone on the whole formula domain gamma > -1: it rises to
~0.3003 at gamma = (sqrt(5)-3)/2 ~ -0.38 and falls after. Exponents below 0 weight the *oldest*
weights the most (tau^gamma blows up at tau = 0), which is no moving average, so edmkit only accepts
gamma >= 0, i.e. 0 < sigma_rel <= STD_MAX = sqrt(1/12) (gamma = 0 is the plain running mean).
On this range exp_to_std is strictly decreasing and std_to_exp is its exact inverse.

Discrete vs continuous. With an update after every batch of b images, beta = (1 - b/t)^(gamma+1),
the weight the running average gives to the parameters theta_k held over (t_k - b, t_k] is exactly
the integral of p_{gamma,t} over that interval (telescoping product). So the continuous profiles with
time origin 0 describe the discrete EMA exactly for a piecewise-constant trajectory, and the first
update (t = b, beta = 0) discards the initial values. Post-hoc reconstruction therefore inherits
only the L2 approximation error of the least-squares fit, not a discretisation error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from scipy.optimize import brentq

STD_MAX = math.sqrt(1.0 / 12.0)  # sigma_rel at gamma = 0 (uniform average); largest accepted.


def exp_to_std(gamma: float | np.ndarray) -> float | np.ndarray:
    """Relative standard deviation of a power-function profile (EDM2 Eq. 3).

    sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))).

    Args:
        gamma: Exponent(s) gamma >= 0, scalar or array of any shape.

    Returns:
        sigma_rel with the shape of `gamma` (a Python float for scalar input).

    Raises:
        ValueError: if any gamma is negative or not finite (see the module docstring).
    """
    g = np.asarray(gamma, dtype=np.float64)
    if not np.all(np.isfinite(g)) or np.any(g < 0):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    std = np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    return float(std) if std.ndim == 0 else std


def _std_to_exp_scalar(std: float) -> float:
    # The cubic sigma^2 (g+2)^2 (g+3) - (g+1) = 0 has exactly one root in [0, inf) when
    # 0 < sigma <= STD_MAX. Solve its log form (well scaled even for gamma ~ 1e6) on the bracket
    # [0, 1/sigma^2]: h(0) >= 0, and at g = 1/sigma^2, (g+1)/((g+2)^2 (g+3)) < 1/g^2 = sigma^2.
    def h(g: float) -> float:
        return math.log(g + 1) - 2 * math.log(std) - 2 * math.log(g + 2) - math.log(g + 3)

    if h(0.0) <= 0:  # std == STD_MAX up to rounding
        return 0.0
    return brentq(h, 0.0, 1.0 / std**2, xtol=1e-14, rtol=1e-15, maxiter=500)


def std_to_exp(std: float | np.ndarray) -> float | np.ndarray:
    """Exponent gamma of a power-function profile from its sigma_rel (inverse of EDM2 Eq. 3).

    Returns the root gamma >= 0 of the cubic sigma_rel^2 (gamma+2)^2 (gamma+3) - (gamma+1) = 0
    (its largest real root; the other two lie below -0.38 and are excluded, see module docstring).

    Args:
        std: sigma_rel in (0, STD_MAX], STD_MAX = sqrt(1/12) ~ 0.2887, scalar or array.

    Returns:
        gamma with the shape of `std` (a Python float for scalar input).

    Raises:
        ValueError: if any std is <= 0, > STD_MAX or not finite.
    """
    s = np.asarray(std, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0) or np.any(s > STD_MAX):
        raise ValueError(f"std (sigma_rel) must be in (0, {STD_MAX:.6f}], got {std}")
    gamma = np.array([_std_to_exp_scalar(float(v)) for v in s.reshape(-1)]).reshape(s.shape)
    return float(gamma) if gamma.ndim == 0 else gamma


def power_function_beta(*, gamma: float, cur_nimg: int, batch_nimg: int) -> float:
    """Decay of the power-function EMA update (EDM2 Eq. 4), time in images.

    beta = (1 - batch_nimg / cur_nimg)^(gamma+1); the update is
    theta_hat <- beta * theta_hat + (1 - beta) * theta.

    Args:
        gamma: Profile exponent, >= 0.
        cur_nimg: Images seen including the batch just trained on (t); >= batch_nimg.
        batch_nimg: Images in that batch (the time step); > 0.

    Returns:
        beta in [0, 1); exactly 0 on the first update (cur_nimg == batch_nimg).
    """
    if batch_nimg <= 0 or cur_nimg < batch_nimg:
        raise ValueError(f"need 0 < batch_nimg <= cur_nimg, got {batch_nimg=}, {cur_nimg=}")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    return (1.0 - batch_nimg / cur_nimg) ** (gamma + 1)


def power_function_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """Inner product <p_a, p_b> of two normalised power-function profiles (EDM2 App. C.2).

    <p_a, p_b> = integral_0^inf p_a p_b dtau
               = (g_a+1)(g_b+1) m^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)),
    with m = min(t_a, t_b): the "t_min" of PAPERS.md is the end of the shared support, not a
    time origin; every profile starts at tau = 0. Evaluated as ratios (m/t)^(g+1) / m so that
    t ~ 1e9 images with gamma ~ 20 cannot overflow.

    Args:
        t_a, gamma_a, t_b, gamma_b: Array-likes broadcast together; times > 0, exponents >= 0.

    Returns:
        float64 array of the broadcast shape.
    """
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    if np.any(t_a <= 0) or np.any(t_b <= 0):
        raise ValueError("profile times must be > 0")
    if np.any(g_a < 0) or np.any(g_b < 0):
        raise ValueError("profile exponents must be >= 0")
    m = np.minimum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (m / t_a) ** (g_a + 1) * (m / t_b) ** (g_b + 1) / m


def _gram(t: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """A_ij = <p_i, p_j> for profiles (t_i, gamma_i). Shapes: [n] -> [n, n]."""
    return power_function_inner(t[:, None], gamma[:, None], t[None, :], gamma[None, :])


def solve_posthoc_coefficients(
    in_nimg, in_std, out_nimg, out_std, *, sum_to_one: bool = True
) -> np.ndarray:
    """Least-squares weights that combine snapshot profiles into target profiles (EDM2 App. C.2).

    For each target r, over the snapshots with t_i <= t_r, minimise ||sum_i x_i p_i - p_r||^2 in
    L2[0, inf): the normal equations A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_r>; snapshots
    taken after t_r get weight 0. Solved in float64 with numpy.linalg.lstsq (minimum-norm, so
    duplicated snapshots are fine).

    sum_to_one (default): also impose sum_i x_i = 1 (equality-constrained least squares via its
    KKT system). Each p_i integrates to 1, so the reconstructed profile integrates to sum_i x_i;
    the constraint makes it a true average, so a parameter that never changed comes back exactly.
    EDM2's plain least squares (sum_to_one=False) misses the sum by 1e-3 to 1e-1 with 4 snapshots
    per EMA and by ~1e-7 to 1e-5 with 64 (target-dependent); the constrained fit is barely worse in
    L2 and still reproduces a tracked profile exactly.

    Args:
        in_nimg: [n_in] snapshot times in images (> 0).
        in_std: [n_in] (or broadcastable) snapshot sigma_rel.
        out_nimg: [n_out] (or scalar) target times in images.
        out_std: [n_out] (or scalar) target sigma_rel.
        sum_to_one: Constrain each column to sum to 1 (see above).

    Returns:
        float64 array [n_in, n_out] of weights x.

    Raises:
        ValueError: on no snapshots, a std outside (0, STD_MAX], non-positive times, or a target
            time before the first snapshot.
    """
    t_in = np.asarray(in_nimg, dtype=np.float64).reshape(-1)  # [n_in]
    if t_in.size == 0:
        raise ValueError("no snapshots")
    if np.any(t_in <= 0):
        raise ValueError("snapshot times must be > 0")
    g_in = np.broadcast_to(std_to_exp(np.asarray(in_std, dtype=np.float64)), t_in.shape)
    t_out, std_out = np.broadcast_arrays(np.asarray(out_nimg, np.float64), np.asarray(out_std, np.float64))
    t_out, g_out = t_out.reshape(-1), np.asarray(std_to_exp(std_out), np.float64).reshape(-1)  # [n_out]

    x = np.zeros((t_in.size, t_out.size))  # [n_in, n_out]
    for j, (t_r, g_r) in enumerate(zip(t_out, g_out)):
        used = np.flatnonzero(t_in <= t_r)
        if used.size == 0:
            raise ValueError(f"out_nimg={t_r:g} is before the first snapshot ({t_in.min():g})")
        t = t_in[used] / t_r  # time scale is arbitrary; t_r = 1 keeps the numbers O(1)
        A = _gram(t, g_in[used])  # [n, n]
        b = power_function_inner(t, g_in[used], 1.0, g_r)  # [n]
        if sum_to_one:
            n = used.size
            kkt = np.zeros((n + 1, n + 1))
            kkt[:n, :n], kkt[:n, n], kkt[n, :n] = A, 1.0, 1.0
            x[used, j] = np.linalg.lstsq(kkt, np.append(b, 1.0), rcond=None)[0][:n]
        else:
            x[used, j] = np.linalg.lstsq(A, b, rcond=None)[0]
    return x


def _ema_copy(value: torch.Tensor) -> torch.Tensor:
    """float32 copy of a floating-point entry; other dtypes copied as they are."""
    value = value.detach()
    return value.to(torch.float32, copy=True) if value.is_floating_point() else value.clone()


class PowerFunctionEMA:
    """Several power-function EMAs of a network's state dict (EDM2 Sec. 3, Eq. 4).

    Tracks float32 copies of every floating-point entry of `net.state_dict()` (parameters and float
    buffers, same keys). Non-float buffers cannot be averaged: they hold the net's latest value.
    Tensors live on the net's device at construction: build the EMA after moving the net.

    Attributes:
        stds: the tracked sigma_rel values, one EMA each.
    """

    def __init__(self, net: torch.nn.Module, *, stds: tuple[float, ...] = (0.050, 0.100)) -> None:
        if len(stds) == 0:
            raise ValueError("need at least one std")
        self.net = net
        self.stds = tuple(float(s) for s in stds)
        self._gammas = tuple(float(std_to_exp(s)) for s in self.stds)  # validates each std
        state = net.state_dict()
        self._emas = [{k: _ema_copy(v) for k, v in state.items()} for _ in self.stds]

    @torch.no_grad()
    def update(self, *, cur_nimg: int, batch_nimg: int) -> None:
        """Fold in the net's current state; call after each optimizer step.

        Args:
            cur_nimg: Images seen including this step.
            batch_nimg: Images in this step's batch.
        """
        state = self.net.state_dict()
        for gamma, ema in zip(self._gammas, self._emas):
            beta = power_function_beta(gamma=gamma, cur_nimg=cur_nimg, batch_nimg=batch_nimg)
            for name, value in state.items():
                if value.is_floating_point():
                    ema[name].lerp_(value.to(torch.float32), 1.0 - beta)  # beta*ema + (1-beta)*value
                else:
                    ema[name].copy_(value)

    def averaged(self, index: int) -> dict[str, torch.Tensor]:
        """State dict of EMA `index`, cast to the net's dtypes (fresh tensors, strict-loadable)."""
        if not 0 <= index < len(self._emas):
            raise ValueError(f"index {index} out of range for {len(self._emas)} EMAs")
        dtypes = {k: v.dtype for k, v in self.net.state_dict().items()}
        return {k: v.to(dtypes[k], copy=True) for k, v in self._emas[index].items()}

    def state_dict(self) -> dict:
        """Resumable state: plain containers of tensors (torch.load(weights_only=True) safe).

        Like nn.Module.state_dict, the tensors are the live buffers, not copies.
        """
        return {"stds": list(self.stds), "emas": [dict(ema) for ema in self._emas]}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()` output, copying in place (keeps device)."""
        if [float(s) for s in state["stds"]] != list(self.stds):
            raise ValueError(f"EMA stds differ: saved {state['stds']}, expected {list(self.stds)}")
        for ema, saved in zip(self._emas, state["emas"], strict=True):
            if saved.keys() != ema.keys():
                raise ValueError(f"EMA keys differ: {sorted(saved.keys() ^ ema.keys())}")
            for name, value in saved.items():
                if value.shape != ema[name].shape or value.dtype != ema[name].dtype:
                    raise ValueError(f"EMA entry {name!r}: saved {value.dtype}{list(value.shape)}, "
                                     f"expected {ema[name].dtype}{list(ema[name].shape)}")
                ema[name].copy_(value)


def _layout(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Key -> (shape, is floating point): what snapshots must agree on."""
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}


def _check_same_layout(ref: dict, state: dict[str, torch.Tensor], nimg: int) -> None:
    layout = _layout(state)
    if layout.keys() != ref.keys():
        raise ValueError(f"snapshot at nimg={nimg}: keys differ: {sorted(layout.keys() ^ ref.keys())}")
    for k, (shape, is_float) in layout.items():
        if (shape, is_float) != ref[k]:
            raise ValueError(f"snapshot at nimg={nimg}: entry {k!r} has shape {list(shape)} "
                             f"(float: {is_float}), expected {list(ref[k][0])} (float: {ref[k][1]})")


def reconstruct(
    snapshots: Iterable[tuple[int, float, Callable[[], dict[str, torch.Tensor]]]],
    *,
    out_nimg: int,
    out_std: float,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Post-hoc EMA: synthesise the (out_std, out_nimg) average from snapshots (EDM2 App. C.2).

    Computes x = solve_posthoc_coefficients(...) and returns sum_i x_i theta_i, loading the
    snapshots with t_i <= out_nimg one at a time (later ones are never loaded). The sum is
    accumulated in float64 (coefficients can be large with alternating signs) and returned as
    float32. Non-float entries are taken from the latest used snapshot.

    Args:
        snapshots: (nimg, std, loader) triples; loader() returns that snapshot's state dict.
        out_nimg: Target time in images.
        out_std: Target sigma_rel in (0, STD_MAX].

    Returns:
        (state_dict, info), info = {"coefficients": float64 [n_snapshots] in input order (0 for
        unused), "cond": condition number of A over the used snapshots, "used": their count}.

    Raises:
        ValueError: no snapshots, bad out_std, out_nimg before the first snapshot, or used
            snapshots whose keys/shapes differ.
    """
    snapshots = list(snapshots)
    if not snapshots:
        raise ValueError("no snapshots")
    t_in = np.array([s[0] for s in snapshots], dtype=np.float64)
    std_in = np.array([s[1] for s in snapshots], dtype=np.float64)
    x = solve_posthoc_coefficients(t_in, std_in, out_nimg, out_std)[:, 0]  # [n_in]
    used = [i for i in np.argsort(t_in, kind="stable") if t_in[i] <= out_nimg]
    cond = float(np.linalg.cond(_gram(t_in[used] / out_nimg, np.asarray(std_to_exp(std_in[used])))))

    acc: dict[str, torch.Tensor] = {}
    ref: dict | None = None
    for i in used:  # ascending time, so non-float entries end at the latest snapshot
        state = snapshots[i][2]()
        if ref is None:
            ref = _layout(state)
        _check_same_layout(ref, state, snapshots[i][0])
        for k, v in state.items():
            if not v.is_floating_point():
                acc[k] = v.detach().clone()
            elif k in acc:
                acc[k].add_(v.detach().to(torch.float64), alpha=float(x[i]))
            else:
                acc[k] = v.detach().to(torch.float64) * float(x[i])
        del state
    result = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in acc.items()}
    return result, {"coefficients": x, "cond": cond, "used": len(used)}
