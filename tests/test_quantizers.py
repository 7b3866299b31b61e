"""Quantizer contract, invariants and one-step equality with a plain-torch reference of DESIGN.md."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bavq.config import ConfigError, QuantizerConfig
from bavq.quantizers import BAVQ, VQEMA, QuantizerOutput, build_quantizer

K, D = 64, 4


def make(kind: str, **kwargs):
    cls = {"vq_ema": VQEMA, "ba_vq": BAVQ}[kind]
    return cls(kwargs.pop("num_codes", K), kwargs.pop("code_dim", D), **kwargs)


def batch(seed: int, b: int = 3, dim: int = D, spatial=(5, 4)) -> torch.Tensor:
    return torch.randn(b, dim, *spatial, generator=torch.Generator().manual_seed(seed))


def buffers(q) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


VARIANTS = [
    ("vq_ema", {}),
    ("vq_ema", {"init": "data", "dead_code_threshold": 1.0}),
    ("vq_ema", {"l2_normalize": True}),
    ("ba_vq", {}),
    ("ba_vq", {"beta_mode": "fixed", "entropy_weight": 0.5, "assign": "map"}),
    ("ba_vq", {"entropy_loss_weight": 0.1, "init": "data", "dead_code_threshold": 1.0}),
]


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("kind,kwargs", VARIANTS)
@pytest.mark.parametrize("spatial", [(), (7,), (5, 4)])
def test_shapes_and_straight_through(kind, kwargs, spatial):
    q = make(kind, **kwargs)
    z = batch(0, spatial=spatial).requires_grad_(True)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.indices.shape == (z.shape[0], *spatial) and out.indices.dtype == torch.int64
    assert out.loss.dim() == 0 and all(v.dim() == 0 for v in out.metrics.values())
    assert {"perplexity", "usage", "usage_window", "distortion"} <= set(out.metrics)
    # Straight-through: d quantized / dz is the identity (through the normalization when l2).
    (grad,) = torch.autograd.grad(out.quantized.sum(), z)
    expected = torch.ones_like(z)
    if kwargs.get("l2_normalize"):
        (expected,) = torch.autograd.grad(F.normalize(z, dim=1).sum(), z)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("kind,kwargs", VARIANTS)
def test_eval_decode_matches_quantized_and_changes_no_buffer(kind, kwargs):
    q = make(kind, **kwargs)
    q(batch(1))  # one training step so that every buffer holds a non-initial value
    before = buffers(q)
    q.eval()
    out = q(batch(2))
    torch.testing.assert_close(q.decode_indices(out.indices), out.quantized, rtol=0, atol=0)
    after = q.state_dict()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


def test_eval_before_training_does_not_initialize():
    q = make("ba_vq", init="data").eval()
    before = buffers(q)
    q(batch(3))
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before.items())
    assert not bool(q.initialized)


@pytest.mark.parametrize("kind,kwargs", [("vq_ema", {}), ("ba_vq", {}),
                                         ("ba_vq", {"entropy_weight": 0.5, "entropy_loss_weight": 0.1})])
def test_fp32_under_bf16_autocast_and_module_casts(kind, kwargs):
    """Forward AND backward inside bf16 autocast give the fp32 results (K = 4096: bf16 would not)."""
    runs = []
    for autocast in (True, False):
        q = make(kind, num_codes=4096, code_dim=8, init="data", **kwargs)
        z = batch(4, b=4, dim=8, spatial=(16, 16)).bfloat16().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = q(z)
            (out.loss * 1000 + out.quantized.float().square().mean()).backward()
        assert out.quantized.dtype == torch.bfloat16
        assert all(b.dtype == torch.float32 for b in q.buffers() if b.is_floating_point())
        runs.append((q, out, z.grad))
    (q, out, grad), (ref, ref_out, ref_grad) = runs
    assert torch.equal(out.indices, ref_out.indices)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(q.state_dict()[name], value, rtol=0, atol=0)
    for name, value in ref_out.metrics.items():
        torch.testing.assert_close(out.metrics[name], value, rtol=0, atol=0)
    q.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in q.buffers() if b.is_floating_point())


@pytest.mark.parametrize("extra", [{}, {"restart_counts": "hard", "dead_code_relative": True}])
def test_state_dict_round_trip_resumes_exactly(extra):
    kwargs = {"dead_code_threshold": 0.5, "init": "data", "entropy_weight": 2.0, "usage_window": 100, **extra}
    q = make("ba_vq", **kwargs)
    for seed in (5, 6):
        q(batch(seed))
    resumed = make("ba_vq", **kwargs)
    resumed.load_state_dict(q.state_dict())
    for name in ("step", "beta", "d_hat", "initialized", "usage_window.tokens"):
        assert torch.equal(resumed.state_dict()[name], q.state_dict()[name]), name
    a, b = q(batch(7)), resumed(batch(7))
    assert torch.equal(a.indices, b.indices)
    for name, value in q.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert {k: float(v) for k, v in a.metrics.items()} == {k: float(v) for k, v in b.metrics.items()}


def test_bad_inputs_raise_one_line_errors():
    q = make("vq_ema")
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 4, \*spatial\)"):
        q(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="decay"):
        VQEMA(8, 2, decay=1.0)
    with pytest.raises(ValueError, match="assign"):
        BAVQ(8, 2, assign="soft")
    with pytest.raises(RuntimeError, match="no pending statistics"):
        q.update_codebook()
    with pytest.raises(ConfigError, match="quantizer.name"):
        build_quantizer(QuantizerConfig(name="fsq"))


def test_build_quantizer_passes_every_field():
    cfg = QuantizerConfig(name="ba_vq", num_codes=32, code_dim=3, decay=0.9, beta_mode="fixed", beta_start=2.0,
                          entropy_weight=0.3, prior_floor=0.2, assign="map", entropy_loss_weight=0.01,
                          dead_code_threshold=0.1, chunk_size=5, chunk_budget_mib=1, l2_normalize=True)
    q = build_quantizer(cfg, seed=3)
    assert isinstance(q, BAVQ) and (q.num_codes, q.code_dim, q.decay, q.seed) == (32, 3, 0.9, 3)
    assert (q.entropy_weight, q.prior_floor, q.assign, q.entropy_loss_weight) == (0.3, 0.2, "map", 0.01)
    assert float(q.beta) == 2.0 and q.rows_per_chunk == 5 and q.l2_normalize
    assert isinstance(build_quantizer(QuantizerConfig()), VQEMA)


def test_chunk_rows_respects_budget():
    assert make("vq_ema", num_codes=16384, chunk_size=8192, chunk_budget_mib=128).rows_per_chunk == 2048
    assert make("vq_ema", num_codes=16384, chunk_size=100, chunk_budget_mib=128).rows_per_chunk == 100


# ----------------------------------------------------------------------------- plain-torch references
def rows_of(z: torch.Tensor) -> torch.Tensor:
    return z.movedim(1, -1).reshape(-1, z.shape[1]).double()


def ref_vq_ema_step(st: dict, x: torch.Tensor, decay: float, eps: float) -> dict:
    e = st["codebook"]
    d = (x[:, None, :] - e[None]).square().sum(-1)
    onehot = F.one_hot(d.argmin(1), e.shape[0]).double()
    count = decay * st["ema_count"] + (1 - decay) * onehot.sum(0)
    sums = decay * st["ema_sum"] + (1 - decay) * onehot.t() @ x
    total = count.sum()
    smoothed = (count + eps) / (total + e.shape[0] * eps) * total
    return {"codebook": sums / smoothed[:, None], "ema_count": count, "ema_sum": sums}


def geo(start, end, step, steps):
    return start * (end / start) ** (min(step, steps) / steps)


def ref_ba_step(st: dict, x: torch.Tensor, hp: dict) -> tuple[dict, dict]:
    """DESIGN.md BA-VQ steps 1-5 on the whole batch, no chunking, float64."""
    num_codes, dim = st["codebook"].shape
    e, count, sums = st["codebook"], st["ema_count"], st["ema_sum"]
    alpha, lam, decay = hp["prior_floor"], hp["entropy_weight"], hp["decay"]
    q = (count / count.sum() + alpha / num_codes) / (1 + alpha)
    d = (x[:, None, :] - e[None]).square().sum(-1)
    d_hat, beta = st["d_hat"], st["beta"]
    if hp["beta_mode"] == "adaptive" and d_hat < 0:  # first batch measures D_hat before the E-step
        d_hat = d.min(1).values.mean()
        beta = hp["adaptive_c_start"] * dim / (2 * d_hat)
    a = (1 - lam) * q.log() - beta * d
    log_p = a - torch.logsumexp(a, 1, keepdim=True)
    p = log_p.exp()
    idx = d.argmin(1) if hp["assign"] == "nearest" else a.argmax(1)
    count = decay * count + (1 - decay) * p.sum(0)
    sums = decay * sums + (1 - decay) * p.t() @ x
    alive = (count > 1e-20 * count.sum())[:, None]
    e = torch.where(alive, sums / count[:, None], e)
    sums = torch.where(alive, sums, count[:, None] * e)
    mean_min = d.min(1).values.mean()
    d_hat = mean_min if d_hat < 0 else 0.9 * d_hat + 0.1 * mean_min
    q = (count / count.sum() + alpha / num_codes) / (1 + alpha)
    step = st["step"] + 1
    if hp["beta_mode"] == "fixed":
        new_beta = geo(hp["beta_start"], hp["beta_end"], step, hp["beta_anneal_steps"])
    else:
        c = geo(hp["adaptive_c_start"], hp["adaptive_c_end"], step, hp["beta_anneal_steps"])
        new_beta = min(c * dim / (2 * float(d_hat)), float(beta) * (1 + hp["max_beta_growth"]))
    entropy = -(p * log_p).sum(1)
    p_bar = p.sum(0) / p.shape[0]
    metrics = {"assign_entropy": entropy.mean(), "distortion_soft": (p * d).sum(1).mean(),
               "distortion": d.gather(1, idx[:, None]).mean(), "beta": beta,
               "rate": -(p_bar * p_bar.log()).sum() - entropy.mean()}
    new = {"codebook": e, "ema_count": count, "ema_sum": sums, "log_prior": q.log(),
           "d_hat": d_hat, "beta": new_beta, "step": step}
    return new, metrics


BA_HP = dict(estep="softmax", prior_floor=0.1, decay=0.9, beta_start=0.5, beta_end=20.0, beta_anneal_steps=10,
             adaptive_c_start=2.0, adaptive_c_end=64.0, max_beta_growth=0.05)


def _state64(q) -> dict:
    st = {k: v.double() for k, v in q.state_dict().items() if v.is_floating_point()}
    st["step"] = int(q.step)
    return st


def test_vq_ema_step_matches_reference_with_chunking():
    q = make("vq_ema", decay=0.9, eps=1e-3, chunk_size=7)  # 60 rows -> 9 chunks
    st = _state64(q)
    for seed in (10, 11, 12):
        z = batch(seed)
        q(z)
        st = ref_vq_ema_step(st, rows_of(z), 0.9, 1e-3)
        for name in ("codebook", "ema_count", "ema_sum"):
            torch.testing.assert_close(getattr(q, name).double(), st[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,lam,assign", [("fixed", 0.5, "nearest"), ("adaptive", 1.0, "nearest"),
                                             ("adaptive", 2.0, "map"), ("fixed", 0.0, "map")])
def test_ba_vq_step_matches_reference_with_chunking(mode, lam, assign):
    hp = dict(BA_HP, beta_mode=mode, entropy_weight=lam, assign=assign)
    q = make("ba_vq", chunk_size=7, **hp)
    st = _state64(q)
    for seed in (20, 21, 22):  # three steps: the prior is no longer uniform after the first
        z = batch(seed)
        out = q(z)
        st, ref_metrics = ref_ba_step(st, rows_of(z), hp)
        for name in ("codebook", "ema_count", "ema_sum", "log_prior"):
            torch.testing.assert_close(getattr(q, name).double(), st[name], rtol=1e-5, atol=1e-6)
        assert int(q.step) == st["step"]
        assert math.isclose(float(q.d_hat), float(st["d_hat"]), rel_tol=1e-5)
        assert math.isclose(float(q.beta), float(st["beta"]), rel_tol=1e-5)
        for name, value in ref_metrics.items():
            assert math.isclose(float(out.metrics[name]), float(value), rel_tol=1e-4, abs_tol=1e-5), name


def test_entropy_loss_value_and_gradient_match_autograd():
    hp = dict(BA_HP, beta_mode="fixed", entropy_weight=0.5, assign="nearest")
    q = make("ba_vq", chunk_size=5, commitment=0.0, entropy_loss_weight=0.7, **hp)
    q(batch(30))  # a non-uniform prior for the step under test
    prior, codes, beta = q.log_prior.double(), q.codebook.double(), float(q.beta)
    z = batch(31).requires_grad_(True)
    out = q(z)
    out.loss.backward()

    z_ref = batch(31).double().requires_grad_(True)
    x = z_ref.movedim(1, -1).reshape(-1, D)
    a = 0.5 * prior - beta * (x[:, None, :] - codes[None]).square().sum(-1)
    p = a.softmax(1)
    p_bar = p.mean(0)
    loss = 0.7 * ((-(p * p.log()).sum(1)).mean() + (p_bar * p_bar.log()).sum())
    loss.backward()
    assert math.isclose(float(out.loss.detach()), float(loss.detach()), rel_tol=1e-4)
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["vq_ema", "ba_vq"])
def test_deferred_update_equals_one_big_batch(kind):
    """Gradient-accumulation API: two micro-batches then update_codebook() == one batch. For the
    softmax E-step only: the balanced one (BA-VQ's default) balances each micro-batch on its own."""
    extra = {"estep": "softmax"} if kind == "ba_vq" else {}
    big, deferred = make(kind, chunk_size=9, **extra), make(kind, chunk_size=9, **extra)
    big(batch(39)), deferred(batch(39))  # adaptive beta measures D_hat on the first batch
    z1, z2 = batch(40), batch(41)
    big_out = big(torch.cat([z1, z2]))
    deferred.auto_update = False
    assert deferred(z1).metrics == {} and int(deferred.step) == 1
    deferred(z2)
    metrics = deferred.update_codebook()
    for name, value in big.state_dict().items():
        torch.testing.assert_close(deferred.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    for name, value in big_out.metrics.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- init, restarts, l2
def _is_row_of(codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (codes[:, None, :] == rows[None]).all(-1).any(1)


@pytest.mark.parametrize("kind", ["vq_ema", "ba_vq"])
@pytest.mark.parametrize("num_rows", [20, 200])  # fewer than K (with replacement) and more (distinct)
def test_data_init_takes_codes_from_the_batch(kind, num_rows):
    q = make(kind, init="data")
    q.auto_update = False
    z = torch.randn(num_rows, D)
    q(z)
    assert bool(q.initialized)
    assert torch.equal(q.ema_sum, q.codebook) and torch.equal(q.ema_count, torch.ones(K))
    assert torch.unique(q.codebook, dim=0).shape[0] == K  # distinct even when K > rows
    from_data = _is_row_of(q.codebook, z)
    if num_rows >= K:
        assert from_data.all()
    else:  # drawn with replacement: first copies are data rows, repeats are jittered copies
        assert 0 < int(from_data.sum()) <= num_rows and not from_data.all()


@pytest.mark.filterwarnings("ignore:quantizer.dead_code_threshold")  # above the mean count on purpose
@pytest.mark.parametrize("kind", ["vq_ema", "ba_vq"])
def test_dead_codes_restart_from_batch_vectors(kind):
    threshold = 0.995  # unused codes decay to 0.99 < threshold, used ones reach >= 0.99 + 0.01
    # softmax E-step: with the balanced one 16 vectors spread mass over all 64 codes and none stays alive
    extra = {"beta_mode": "fixed", "beta_start": 50.0, "estep": "softmax"} if kind == "ba_vq" else {}
    q = make(kind, dead_code_threshold=threshold, decay=0.99, **extra)
    z = torch.randn(16, D)  # 16 vectors cannot keep 64 codes alive
    out = q(z)
    dead = q.ema_count == torch.tensor(threshold)  # restarted codes carry count = threshold
    assert int(out.metrics["restarted_codes"]) == int(dead.sum()) > 20
    assert _is_row_of(q.codebook[dead], z).all()
    torch.testing.assert_close(q.ema_sum[dead], q.codebook[dead] * threshold)


@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_relative_dead_code_threshold_is_a_fraction_of_the_mean_count(scale):
    """dead_code_relative: dead below threshold x mean(ema_count), restarted with that count; the same
    codes die whatever the tokens per code (scale: 16x the tokens, 16x the counts)."""
    q = make("vq_ema", dead_code_threshold=0.5, dead_code_relative=True, decay=0.0)
    z = torch.randn(int(64 * scale), D, generator=torch.Generator().manual_seed(11))
    z = z[torch.arange(z.shape[0]) % 64]  # scale 16: each of 64 vectors 16 times, so counts scale by 16
    out = q(z)  # trains and updates: decay 0 makes ema_count this batch's counts before restarts
    counts = torch.bincount(out.indices.flatten(), minlength=K).float()
    expected_dead = counts < 0.5 * counts.mean()
    assert 0 < int(expected_dead.sum()) < K
    assert int(out.metrics["restarted_codes"]) == int(expected_dead.sum())
    assert torch.equal(q.ema_count == 0.5 * counts.mean(), expected_dead)  # restarted with the limit
    assert _is_row_of(q.codebook[expected_dead], z).all()


def test_ba_vq_hard_restart_counts_find_codes_the_balance_keeps_alive():
    """restart_counts=hard: a code that keeps soft mass but is nobody's nearest code is dead. The
    balanced E-step spreads 4 tight clusters' soft mass over all 64 codes, so the soft counts restart
    few codes; the hard counts (<= 4 codes take the rows) restart the rest. A restarted code moves to a
    batch row, takes hard count = the limit and keeps its soft count."""
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(4, D, generator=gen) * 2)[torch.arange(256) % 4] + 0.01 * torch.randn(256, D, generator=gen)
    kwargs = {"dead_code_threshold": 0.5, "dead_code_relative": True, "decay": 0.0, "seed": 5}
    soft, hard = make("ba_vq", **kwargs), make("ba_vq", restart_counts="hard", **kwargs)
    assert "ema_hard_count" not in soft.state_dict()
    soft_dead = int(soft(z).metrics["restarted_codes"])
    out = hard(z)  # decay 0: ema_hard_count is this batch's hard counts before the restarts
    counts = torch.bincount(out.indices.flatten(), minlength=K).float()
    limit = 0.5 * counts.mean()
    dead = counts < limit
    assert int(dead.sum()) >= K - 8 and soft_dead < 8
    assert int(out.metrics["restarted_codes"]) == int(dead.sum())
    assert _is_row_of(hard.codebook[dead], z).all() and not _is_row_of(hard.codebook[~dead], z).any()
    assert torch.equal(hard.ema_hard_count[dead], torch.full((int(dead.sum()),), float(limit)))
    assert torch.equal(hard.ema_hard_count[~dead], counts[~dead])
    torch.testing.assert_close(hard.ema_sum[dead], hard.codebook[dead] * hard.ema_count[dead][:, None])
    hard(z)  # the next M-step leaves a restarted code where it was put unless rows moved it
    assert torch.isfinite(hard.codebook).all()


def test_absolute_threshold_above_the_mean_count_warns_once():
    """An absolute threshold at or above tokens / K (most codes restarted every step) warns at the first
    update, once; below it, or relative, no warning."""
    import warnings

    for threshold, relative, warns in ((0.5, False, True), (0.1, False, False), (0.5, True, False)):
        q = make("vq_ema", dead_code_threshold=threshold, dead_code_relative=relative)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed in range(3):
                q(torch.randn(32, D))  # 32 tokens / 64 codes: mean count 0.5
        messages = [str(w.message) for w in caught if "dead_code_threshold" in str(w.message)]
        assert len(messages) == int(warns), (threshold, relative, messages)
        if warns:
            assert "32 tokens / 64 codes = 0.5" in messages[0] and "dead_code_relative=true" in messages[0]


@pytest.mark.parametrize("kind", ["vq_ema", "ba_vq"])
def test_l2_normalize_keeps_unit_vectors(kind):
    q = make(kind, l2_normalize=True)
    out = q(batch(50) * 5)
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(K))
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(3, 5, 4))
