"""Losses against hand computations, the gradient-carrying all-gather, the PTHA
stop-gradient, and Slerp's geometry."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cir.losses import LossConfig, angle, collm_three_way, info_nce, ptha_loss, slerp


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


Q = _unit([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
T = _unit([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.2]])


def _hand_ce(q, t, scale):
    """mean_i -log softmax_j(scale * <q_i, t_j>)[i], written out in plain Python."""
    q, t = q.tolist(), t.tolist()
    total = 0.0
    for i in range(len(q)):
        logits = [scale * sum(a * b for a, b in zip(q[i], t[j])) for j in range(len(t))]
        log_z = math.log(sum(math.exp(v) for v in logits))
        total += log_z - logits[i]
    return total / len(q)


def test_info_nce_matches_hand_computation():
    got = info_nce(Q, T, 2.0)
    assert got.item() == pytest.approx(_hand_ce(Q, T, 2.0), abs=1e-12)
    # a tensor scale of shape [1] (the composer's parameter shape) gives the same
    assert info_nce(Q, T, torch.tensor([2.0], dtype=torch.float64)).item() == pytest.approx(got.item())


def test_info_nce_symmetric_adds_target_to_query():
    got = info_nce(Q, T, 3.0, symmetric=True)
    assert got.item() == pytest.approx(0.5 * (_hand_ce(Q, T, 3.0) + _hand_ce(T, Q, 3.0)), abs=1e-12)


def test_gather_on_one_process_is_a_no_op(tmp_path):
    import torch.distributed as dist

    plain = info_nce(Q, T, 2.0, gather=False)
    assert info_nce(Q, T, 2.0, gather=True).item() == plain.item()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert info_nce(Q, T, 2.0, gather=True).item() == plain.item()
    finally:
        dist.destroy_process_group()


def test_collm_three_way_is_the_weighted_sum():
    img = _unit([[1.0, 1.0], [1.0, -1.0], [0.2, 1.0]])
    txt = _unit([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    out = collm_three_way(Q, img, txt, T, 2.0, weights=(1.0, 0.5, 2.0))
    parts = [_hand_ce(Q, T, 2.0), _hand_ce(img, T, 2.0), _hand_ce(txt, T, 2.0)]
    assert out["composed"].item() == pytest.approx(parts[0], abs=1e-12)
    assert out["image"].item() == pytest.approx(parts[1], abs=1e-12)
    assert out["text"].item() == pytest.approx(parts[2], abs=1e-12)
    assert out["loss"].item() == pytest.approx(parts[0] + 0.5 * parts[1] + 2.0 * parts[2], abs=1e-12)
    # a missing query kind drops its term
    assert collm_three_way(Q, None, None, T, 2.0)["loss"].item() == pytest.approx(parts[0], abs=1e-12)


def test_ptha_loss_matches_hand_computation():
    t2t = _unit([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    proto = _unit([[1.0, 0.2], [0.3, 0.9], [-0.5, 1.0]])
    rev = _unit([[0.9, 0.1], [0.5, 0.5], [-0.2, 1.0]])
    mse = sum((a - b) ** 2 for ra, rb in zip(proto.tolist(), rev.tolist()) for a, b in zip(ra, rb)) / 6
    out = ptha_loss(Q, T, t2t, proto, rev, 2.0, w_t2t=0.4, w_p2p=0.4, p2p_kind="mse")
    assert out["q2t"].item() == pytest.approx(_hand_ce(Q, T, 2.0), abs=1e-12)
    assert out["t2t"].item() == pytest.approx(_hand_ce(t2t, T, 2.0), abs=1e-12)
    assert out["p2p"].item() == pytest.approx(mse, abs=1e-12)
    want = _hand_ce(Q, T, 2.0) + 0.4 * _hand_ce(t2t, T, 2.0) + 0.4 * mse
    assert out["loss"].item() == pytest.approx(want, abs=1e-12)
    con = ptha_loss(Q, T, t2t, proto, rev, 2.0, w_t2t=0.5, w_p2p=0.5, p2p_kind="contrastive")
    assert con["p2p"].item() == pytest.approx(_hand_ce(proto, rev, 2.0), abs=1e-12)
    no_rev = ptha_loss(Q, T, t2t, proto, None, 2.0)
    assert "p2p" not in no_rev
    # defaults follow the authors' code: MSE, 0.4 / 0.4
    assert ptha_loss(Q, T, t2t, proto, rev, 2.0)["loss"].item() == pytest.approx(want, abs=1e-12)
    assert (LossConfig().w_t2t, LossConfig().w_p2p, LossConfig().p2p_kind) == (0.4, 0.4, "mse")


@pytest.mark.parametrize("kind", ["mse", "contrastive"])
def test_ptha_reverse_prototype_gets_no_gradient(kind):
    proto = _unit([[1.0, 0.2], [0.3, 0.9], [-0.5, 1.0]]).requires_grad_()
    rev = _unit([[0.9, 0.1], [0.5, 0.5], [-0.2, 1.0]]).requires_grad_()
    # L_p2p alone (no q2t / t2t terms touch proto or rev) isolates the stop-gradient
    out = ptha_loss(Q, T, None, proto, rev, 2.0, w_t2t=0.0, w_p2p=1.0, p2p_kind=kind)
    out["loss"].backward()
    assert rev.grad is None or not rev.grad.any()
    assert proto.grad is not None and proto.grad.abs().sum() > 1e-6
    # without the stop-gradient rev would get one: the check above is not vacuous
    rev2 = rev.detach().clone().requires_grad_()
    F.mse_loss(proto.detach(), rev2).backward()
    assert rev2.grad.abs().sum() > 1e-6


def test_slerp_properties():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(64, 16, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(64, 16, generator=g, dtype=torch.float64), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-12)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-12)
    for alpha in (0.25, 0.5, 0.9):
        out = slerp(a, b, alpha)
        assert torch.allclose(out.norm(dim=-1), torch.ones(64, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(angle(a, out), alpha * angle(a, b), atol=1e-10)
        assert torch.allclose(angle(out, b), (1 - alpha) * angle(a, b), atol=1e-10)
    # one alpha per row
    alphas = torch.linspace(0, 1, 64, dtype=torch.float64)
    assert torch.allclose(angle(a, slerp(a, b, alphas)), alphas * angle(a, b), atol=1e-10)


def test_slerp_near_parallel_is_finite_and_unit():
    a = F.normalize(torch.randn(8, 32), dim=-1)
    for eps in (0.0, 1e-9, 1e-7, 1e-4):
        b = F.normalize(a + eps * torch.randn(8, 32), dim=-1).requires_grad_()
        out = slerp(a, b, 0.5)
        assert torch.isfinite(out).all()
        assert torch.allclose(out.norm(dim=-1), torch.ones(8), atol=1e-5)
        assert (out - a).norm(dim=-1).max() <= (b - a).norm(dim=-1).max() + 1e-6
        out.sum().backward()
        assert torch.isfinite(b.grad).all()


# ---- two processes (gloo): the gathered loss is the loss on the concatenated batch ----

B, D_IN, D = 3, 5, 4


class _Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(D_IN, D)
        self.t = torch.nn.Linear(D_IN, D)

    def forward(self, xq, xt):
        return F.normalize(self.q(xq), dim=-1), F.normalize(self.t(xt), dim=-1)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, D_IN, generator=g), torch.randn(2 * B, D_IN, generator=g)


def _grads_after(model, xq, xt, symmetric, gather):
    model.zero_grad()
    q, t = model(xq, xt)
    loss = info_nce(q, t, 4.0, gather=gather, symmetric=symmetric)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _gather_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DDP(_Towers())
        xq, xt = _inputs()
        sl = slice(rank * B, (rank + 1) * B)
        for symmetric in (False, True):
            loss, grads = _grads_after(model, xq[sl], xt[sl], symmetric, gather=True)
            dist.all_reduce(loss)  # mean over ranks = mean over the global batch
            if rank == 0:
                np.save(Path(out_dir) / f"loss_{symmetric}.npy", (loss / world).numpy())
                for i, g in enumerate(grads):  # DDP has averaged them over ranks
                    np.save(Path(out_dir) / f"grad_{symmetric}_{i}.npy", g.numpy())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # About 1 run in 10 a rank aborted at exit ("terminate called without an active
    # exception": a gloo thread left joinable at C++ teardown) after its work was done
    # and saved: a finished rank leaves without that teardown.
    os._exit(0)


def test_gathered_info_nce_equals_single_process_on_the_concatenated_batch():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gather_worker, args=(2, str(Path(tmp) / "init"), tmp), nprocs=2, join=True)
        torch.manual_seed(0)
        model = _Towers()
        xq, xt = _inputs()
        for symmetric in (False, True):
            loss, grads = _grads_after(model, xq, xt, symmetric, gather=False)
            got = np.load(Path(tmp) / f"loss_{symmetric}.npy")
            assert got == pytest.approx(loss.item(), abs=1e-6)
            for i, g in enumerate(grads):
                dist_g = np.load(Path(tmp) / f"grad_{symmetric}_{i}.npy")
                np.testing.assert_allclose(dist_g, g.numpy(), atol=1e-6)
        # a gather that cut the graph would lose the other rank's queries' pull on the
        # local targets and give different target-tower gradients: the check is not vacuous
        model.zero_grad()
        _cut_graph_loss(*model(xq, xt)).backward()
        assert not np.allclose(model.t.weight.grad.numpy(), np.load(Path(tmp) / "grad_False_2.npy"), atol=1e-4)


def _cut_graph_loss(q, t):
    """What the two ranks would compute if the all-gather returned the other rank's
    targets detached (a plain dist.all_gather)."""
    total = 0.0
    for r in range(2):
        keys = torch.cat([t[k * B:(k + 1) * B] if k == r else t[k * B:(k + 1) * B].detach() for k in range(2)])
        logits = 4.0 * q[r * B:(r + 1) * B] @ keys.t()
        total = total + F.cross_entropy(logits, torch.arange(B) + r * B)
    return total / 2
