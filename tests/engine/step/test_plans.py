"""Merging programs' attention plans: each program's rows attend as they would alone."""

import torch

from engine.models.attention import AttentionPlan, AttnLayer, CrossMix, attention
from engine.step import MergedPlan, merge

CROSS, SELF = AttnLayer(0, "c", True, "down", 2), AttnLayer(1, "s", False, "down", 2)
LAYERS = [CROSS, SELF]
H, NQ, NK, D = 2, 16, 7, 16


def _qkv(b, seed, nk):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, H, n, D, generator=g) for n in (NQ, nk, nk))


def _p2p_like(store=None):
    """4 rows [u_src, u_edit, src, edit]: the edit row mixes the source's probabilities in
    cross-attention and reads its queries/keys in self-attention."""
    rows = torch.tensor([0, 1, 2, 2])
    g = torch.Generator().manual_seed(9)
    alpha = torch.ones(4, NK)
    alpha[3] = torch.rand(NK, generator=g)
    beta = torch.zeros(4, NK)
    beta[3] = 1 - alpha[3]
    mix = CrossMix(rows, rows, None, alpha, beta, own=(3, 4))
    return AttentionPlan(self_inject={"q_from": rows, "k_from": rows}, layers=frozenset({0, 1}), cross_mix=mix,
                         store={} if store is None else {0: store})


def test_merged_rows_attend_as_alone():
    a_store, lone_store = torch.zeros(4, NQ, NK), torch.zeros(4, NQ, NK)
    plans = [(_p2p_like(a_store), 0, 4), (None, 4, 3), (_p2p_like(), 7, 4),
             (AttentionPlan(store={0: torch.zeros(2, NQ, NK)}), 11, 2)]
    total = 14  # one idle row
    merged = merge(plans, total, LAYERS, "cpu")
    assert isinstance(merged, MergedPlan)
    for layer, nk in ((CROSS, NK), (SELF, NQ)):
        q, k, v = _qkv(total, 1, nk)
        out = attention(q, k, v, layer, merged)
        merged.copy_back()
        for plan, off, n in plans:
            if plan is not None and plan.store:
                own_store = {0: lone_store[:n]}
                plan_alone = AttentionPlan(plan.self_inject, plan.cross_inject, plan.layers, plan.token_weights,
                                           own_store, plan.ip, plan.cross_mix)
            else:
                plan_alone = plan
            want = attention(q[off:off + n], k[off:off + n], v[off:off + n], layer, plan_alone)
            # equal up to the rounding of SDPA over 14 rows vs over n (its CPU kernel blocks by batch)
            torch.testing.assert_close(out[off:off + n], want, atol=1e-6, rtol=1e-5)
            if layer.cross and plan is not None and plan.store:
                torch.testing.assert_close(plan.store[0], lone_store[:n], atol=1e-7, rtol=0)
    assert a_store.abs().sum() > 0


def test_one_program_filling_the_call_keeps_its_plan():
    p = _p2p_like()
    assert merge([(p, 0, 4)], 4, LAYERS, "cpu") is p
    assert merge([(None, 0, 4), (None, 4, 2)], 6, LAYERS, "cpu") is None
    assert isinstance(merge([(p, 0, 4)], 6, LAYERS, "cpu"), MergedPlan)  # padded: indices over 6 rows


def test_merged_crossmix_has_one_own_range_per_program():
    m = merge([(_p2p_like(), 0, 4), (_p2p_like(), 4, 4)], 8, LAYERS, "cpu")
    mix = m.mix(CROSS)
    assert mix.own_ranges() == ((3, 4, False), (7, 8, False))
    assert mix.q_from.tolist() == [0, 1, 2, 2, 4, 5, 6, 6] and m.mix(SELF) is None
    assert m.args(SELF)["q_from"].tolist() == [0, 1, 2, 2, 4, 5, 6, 6]
