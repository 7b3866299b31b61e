"""BA-VQ's anneal schedule, balanced (Sinkhorn) E-step, underflow metric and duplicate-free data init,
against float64 references written here from DESIGN.md (no chunking, whole N x K matrices)."""

from __future__ import annotations

import math

import pytest
import torch
from _mp import run_distributed  # tests/ is on sys.path under pytest (no package)

from bavq.quantizers import BAVQ, VQEMA, _sinkhorn

K, D = 37, 3  # chunk sizes 7 and 11 divide neither N = 60 nor K


def batch(seed: int, n: int = 60) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, D, generator=gen) * 0.5 + 1.5  # off-centre: random codes start far away
    return rows.view(n // 4, 4, D).permute(0, 2, 1).contiguous()  # (B, D, 4)


def rows64(z: torch.Tensor) -> torch.Tensor:
    return z.movedim(1, -1).reshape(-1, D).double()


def ref_balanced_log_weight(a: torch.Tensor, log_ratio: torch.Tensor, iters: int) -> torch.Tensor:
    """v with p = exp(a + u + v): u_x = -lse_k(a + v), v_k = log(n r_k) - lse_x(a + u)."""
    n = a.shape[0]
    v = torch.zeros(a.shape[1], dtype=a.dtype)
    for _ in range(iters):
        u = -torch.logsumexp(a + v, 1, keepdim=True)
        v = math.log(n) + log_ratio - torch.logsumexp(a + u, 0)
    return v


def ref_step(st: dict, x: torch.Tensor, hp: dict) -> dict:
    """One BA-VQ step in float64: anneal beta (measured start, reach floor, capped cooling, cold end),
    softmax or balanced E-step, M-step."""
    e, count, sums = st["codebook"], st["ema_count"], st["ema_sum"]
    lam, alpha, decay = hp["entropy_weight"], 0.1, hp["decay"]
    d = (x[:, None, :] - e[None]).square().sum(-1)  # (N, K)
    gap = (d - d.min(1, keepdim=True).values).min(0).values.max()
    cov = torch.cov(x.t(), correction=0)
    critical = 2 * torch.linalg.eigvalsh(cov).max()
    beta, d_hat = st["beta"], st["d_hat"]
    if d_hat < 0:
        d_hat = d.min(1).values.mean()
        beta = hp["anneal_start_nats"] / max(gap, min(d_hat, critical))
    q = (count / count.sum() + alpha / K) / (1 + alpha)
    a = (1 - lam) * q.log() - beta * d
    if hp["estep"] == "balanced":
        log_ratio = torch.full((K,), -math.log(K), dtype=x.dtype) if hp["balance_target"] == "uniform" else q.log()
        a = a + ref_balanced_log_weight(a, log_ratio, hp["balance_iters"])
    p = torch.softmax(a, 1)
    idx = d.argmin(1) if hp["assign"] == "nearest" else a.argmax(1)
    count = decay * count + (1 - decay) * p.sum(0)
    sums = decay * sums + (1 - decay) * p.t() @ x
    e = sums / count[:, None]
    d_hat = 0.9 * d_hat + 0.1 * d.min(1).values.mean()
    cold = hp["anneal_end_nats"] / d_hat
    cooled = beta * (1 + hp["anneal_rate"] * (1 - decay))
    new_beta = min(cold, max(cooled, hp["anneal_start_nats"] / max(gap, min(d_hat, critical))))
    return {"codebook": e, "ema_count": count, "ema_sum": sums, "beta": new_beta, "d_hat": d_hat,
            "used_beta": beta, "p": p, "indices": idx}


HP = dict(decay=0.8, anneal_start_nats=1.0, anneal_end_nats=20.0, anneal_rate=0.5, balance_iters=4,
          balance_target="uniform")


@pytest.mark.parametrize("estep", ["softmax", "balanced"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("assign", ["nearest", "map"])
@pytest.mark.parametrize("chunk", [7, 11])
def test_anneal_and_balanced_match_float64_reference(estep, lam, assign, chunk):
    hp = dict(HP, estep=estep, entropy_weight=lam, assign=assign)
    q = BAVQ(K, D, chunk_size=chunk, beta_mode="anneal", **hp)
    st = {k: v.double() for k, v in q.state_dict().items() if v.is_floating_point()}
    for seed in (1, 2, 3, 4):
        z = batch(seed)
        out = q(z)
        ref = ref_step(st, rows64(z), hp)
        st = ref
        assert math.isclose(float(out.metrics["beta"]), float(ref["used_beta"]), rel_tol=1e-5)
        for name in ("codebook", "ema_count", "ema_sum"):
            torch.testing.assert_close(getattr(q, name).double(), ref[name], rtol=2e-5, atol=2e-6)
        assert math.isclose(float(q.beta), float(ref["beta"]), rel_tol=1e-5)
        assert torch.equal(out.indices.reshape(-1), ref["indices"])
        if estep == "balanced":  # rows sum to 1 by construction; columns approach n / K
            assert float(out.metrics["assign_entropy"]) > 0


def test_balanced_columns_converge_to_the_target():
    """With enough Sinkhorn iterations the soft counts equal n r_k, uniform or the prior."""
    for target in ("uniform", "prior"):
        q = BAVQ(K, D, beta_mode="fixed", beta_start=2.0, estep="balanced", balance_iters=200,
                 balance_target=target, decay=0.0, chunk_size=7)
        q.log_prior.copy_(torch.log_softmax(torch.randn(K, generator=torch.Generator().manual_seed(5)), 0))
        ratio = q.log_prior.exp() if target == "prior" else torch.full((K,), 1.0 / K)
        q(batch(9))
        # decay 0: ema_count is this batch's column sums
        torch.testing.assert_close(q.ema_count, 60 * ratio, rtol=1e-3, atol=1e-4)


def test_warm_started_iterations_accumulate_over_calls():
    """balance_warm_start: k calls of one Sinkhorn iteration, each starting from the last v, are k
    iterations; on a fixed batch and codebook they equal one cold call of k iterations."""
    x, codebook = batch(3).movedim(1, -1).reshape(-1, D), torch.randn(K, D, generator=torch.Generator().manual_seed(4))
    log_ratio = torch.full((K,), -math.log(K))
    cold = _sinkhorn.balance_potentials(x, codebook, None, 2.0, 7, log_ratio, 5)
    warm = None
    for _ in range(5):
        warm = _sinkhorn.balance_potentials(x, codebook, None, 2.0, 7, log_ratio, 1, warm)
    torch.testing.assert_close(warm, cold, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("iters, scale", [(1, False), (0, False), (0, True)])
def test_warm_start_is_used_and_resumes_from_the_state_dict(iters, scale):
    make = lambda warm: BAVQ(K, D, balance_iters=iters if warm else 1, balance_warm_start=warm,  # noqa: E731
                             balance_beta_scale=scale and warm, chunk_size=7)
    straight, cold = make(True), make(False)
    for seed in (1, 2, 3):
        straight(batch(seed)), cold(batch(seed))
    assert float(straight.balance_v.abs().max()) > 0 and "balance_v" not in cold.state_dict()
    assert not torch.equal(straight.codebook, cold.codebook)  # the second and third steps started warm
    first = make(True)
    first(batch(1)), first(batch(2))
    resumed = make(True)
    resumed.load_state_dict(first.state_dict())
    resumed(batch(3))
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("target, scale", [("uniform", False), ("prior", False), ("uniform", True)])
def test_online_balance_is_one_sinkhorn_step_from_the_steps_own_pass(monkeypatch, target, scale):
    """balance_iters 0: the E-step makes no Sinkhorn pass (one soft pass per step), and after the step
    balance_v has taken exactly one Sinkhorn iteration from the v it used, on the step's batch and
    pre-update codebook (float64 reference, no chunking). With balance_beta_scale the v it used is the
    carried one times beta / (the beta it was computed at); beta changes every step here."""
    q = BAVQ(K, D, beta_mode="fixed", beta_start=1.0, beta_end=4.0, beta_anneal_steps=3, balance_iters=0,
             balance_warm_start=True, balance_beta_scale=scale, balance_target=target, entropy_weight=2.0,
             chunk_size=7)
    passes = []
    monkeypatch.setattr(_sinkhorn, "_column_lse_eager", lambda *a: passes.append(a))
    monkeypatch.setattr(_sinkhorn, "fused_backend", lambda *a: None)
    beta_then = None
    for seed in (1, 2, 3):
        z = batch(seed)
        beta = float(q.beta)
        v0, e0, log_prior0 = q.balance_v.double(), q.codebook.double(), q.log_prior.double()
        if scale and beta_then is not None:
            v0 = v0 * (beta / beta_then)
        q(z)
        beta_then = beta
        x = rows64(z)
        a = -1.0 * log_prior0 - beta * torch.cdist(x, e0).square()  # (1 - lambda) log q - beta d
        log_ratio = log_prior0 if target == "prior" else torch.full((K,), -math.log(K), dtype=torch.float64)
        u = -torch.logsumexp(a + v0, 1, keepdim=True)
        expected = v0 + math.log(x.shape[0]) + log_ratio - torch.logsumexp(a + v0 + u, 0)
        torch.testing.assert_close(q.balance_v.double(), expected, rtol=1e-4, atol=1e-3)
    assert passes == [] and torch.isfinite(q.balance_v).all()


def test_balance_tv_measures_how_balanced_the_estep_was():
    """balance_tv = 0.5 sum_k |S_k / n - r_k| from the step's own soft counts: near 0 after many Sinkhorn
    iterations, large for the softmax E-step from off-centre random codes (float64 reference)."""
    def step(**kw):
        torch.manual_seed(5)
        q = BAVQ(K, D, beta_mode="fixed", beta_start=2.0, beta_end=2.0, chunk_size=7, **kw)
        e = q.codebook.double()
        out = q(batch(1))
        p = torch.softmax(-2.0 * torch.cdist(rows64(batch(1)), e).square(), 1)
        return float(out.metrics["balance_tv"]), p
    balanced, _ = step(balance_iters=30)
    softmax, p = step(estep="softmax")
    expected = 0.5 * (p.mean(0) - 1.0 / K).abs().sum()
    assert softmax == pytest.approx(float(expected), rel=1e-4)
    assert balanced < 0.02 < 0.3 < softmax


@pytest.mark.parametrize("estep", ["softmax", "balanced"])
@pytest.mark.parametrize("beta", [1e-8, 1e8])
@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_extreme_beta_stays_finite(estep, beta, lam):
    q = BAVQ(K, D, beta_mode="fixed", beta_start=beta, beta_end=beta, estep=estep, entropy_weight=lam,
             chunk_size=11, assign="map")
    for seed in (1, 2):
        out = q(batch(seed) * 3)
        for name, value in out.metrics.items():
            assert torch.isfinite(value).all(), name
        for name, value in q.state_dict().items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), name


def test_underflow_codes_counts_codes_without_mass():
    q = BAVQ(K, D, beta_mode="fixed", beta_start=2.0, beta_end=2.0, estep="softmax")  # no column potentials
    far = torch.arange(K) >= 30  # 7 codes 100 units away: beta * d ~ 6e4 nats, zero mass in fp32
    q.codebook[far] += 100.0
    q.ema_sum.copy_(q.codebook)
    out = q(batch(1))
    assert int(out.metrics["underflow_codes"]) == int(far.sum())
    hot = BAVQ(K, D, beta_mode="fixed", beta_start=1e-6, beta_end=1e-6)
    assert int(hot(batch(1)).metrics["underflow_codes"]) == 0


def test_anneal_start_reaches_every_code_and_ends_cold():
    """Random codes far from the data: the measured hot start gives every code mass, and beta
    reaches the cold end anneal_end_nats / D_hat."""
    q = BAVQ(K, D, decay=0.5, anneal_end_nats=8.0, anneal_rate=1.0)
    q.codebook.mul_(20.0)
    q.ema_sum.copy_(q.codebook)
    out = q(batch(1))
    assert int(out.metrics["underflow_codes"]) == 0 and float(out.metrics["assign_entropy"]) > 1.0
    for seed in range(2, 300):
        q(batch(seed))
    assert math.isclose(float(q.beta) * float(q.d_hat), 8.0, rel_tol=1e-5)


# ----------------------------------------------------------------------------- data init, K > rows
BIG_K, ROWS = 256, 40  # 40 global rows (20 per rank) for 256 codes


def _init_worker(rank: int, world_size: int) -> dict:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(ROWS // 4, D, 4, generator=gen)
    out = {}
    for name, cls in (("vq_ema", VQEMA), ("ba_vq", BAVQ)):
        q = cls(BIG_K, D, init="data", seed=11)
        q(z.chunk(world_size)[rank])
        out[name] = q.codebook.numpy()
    return out


def test_data_init_with_more_codes_than_rows_is_distinct_and_rank_identical():
    ranks = run_distributed(_init_worker, 2)
    single = _init_worker(0, 1)
    for name in ("vq_ema", "ba_vq"):
        a, b, one = (torch.from_numpy(r[name]) for r in (*ranks, single))
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, one, rtol=1e-6, atol=1e-6)
        # codebook after one update: the init was distinct, and so are the updated codes
        assert torch.unique(a, dim=0).shape[0] == BIG_K, name


@pytest.mark.parametrize("beta_mode", ["anneal", "adaptive", "fixed"])
@pytest.mark.parametrize("estep", ["balanced", "softmax"])
def test_steady_state_step_reads_the_device_once(monkeypatch, beta_mode, estep):
    # Issue 15: on a GPU every host read of a tensor (float(), bool(), .item()) waits for the device.
    # After the first steps (start measurement, data init) a BA-VQ step reads beta once (the kernels'
    # scalar argument) and VQ-EMA not at all; schedules, D_hat and the gaps stay on the device.
    ba = BAVQ(256, 8, beta_mode=beta_mode, estep=estep).train()
    vq = VQEMA(256, 8, init="data").train()
    z = torch.randn(4, 8, 8, 8, requires_grad=True)
    for _ in range(2):
        ba(z), vq(z)
    reads = []
    for name in ("__float__", "__bool__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    ba(z)
    ba_reads, reads[:] = list(reads), []
    vq(z)
    assert ba_reads == ["__float__"] and reads == []
