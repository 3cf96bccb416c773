"""mpvg_kernels.layers: DualLayerNorm and LastLayerNormPE against nn.LayerNorm compositions (values and gradients),
their drop-in use in a plain pre-norm block, and the PECache rules (hits, every invalidation, grad, tracing)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpvg_kernels.layers import DualLayerNorm, LastLayerNormPE, PECache, cache_bypassed, optimizer_step_count

B, N, D = 3, 7, 24
TOL = dict(atol=1e-5, rtol=1e-5)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randomize(*modules):
    with torch.no_grad():
        for i, m in enumerate(modules):
            for name, p in m.named_parameters():
                r = torch.randn(p.shape, generator=_g(100 + i * 10 + len(name)))
                p.copy_(1 + 0.5 * r if name.endswith("weight") else 0.5 * r)


def _layer_norms(seed=0):
    ln, lnp = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
    _randomize(ln, lnp)
    return ln, lnp


def _copy_dual(ln, lnp):
    m = DualLayerNorm(D)
    with torch.no_grad():
        m.weight.copy_(ln.weight)
        m.bias.copy_(ln.bias)
        m.pos_weight.copy_(lnp.weight)
        m.pos_bias.copy_(lnp.bias)
    return m


def _grads(*ts):
    return [t.grad.clone() for t in ts]


@pytest.mark.parametrize("pos_shape", [(N, D), (1, N, D)])
def test_dual_layer_norm_matches_two_layer_norms(pos_shape):
    ln, lnp = _layer_norms()
    m = _copy_dual(ln, lnp)
    x = torch.randn(B, N, D, generator=_g(1), requires_grad=True)
    pos = torch.randn(*pos_shape, generator=_g(2), requires_grad=True)
    x2, pos2 = x.detach().clone().requires_grad_(), pos.detach().clone().requires_grad_()
    y, pos_next = m(x, pos)
    ey, epos = ln(x2) + lnp(pos2), lnp(pos2)
    assert pos_next.shape == pos.shape and y.shape == x.shape
    torch.testing.assert_close(y, ey, **TOL)
    torch.testing.assert_close(pos_next, epos, **TOL)
    gy, gp = torch.randn_like(y, generator=_g(3)), torch.randn_like(pos_next, generator=_g(4))
    ((y * gy).sum() + (pos_next * gp).sum()).backward()  # pos_next also feeds the next layer
    ((ey * gy).sum() + (epos * gp).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(pos.grad, pos2.grad, **TOL)
    for a, b in ((m.weight, ln.weight), (m.bias, ln.bias), (m.pos_weight, lnp.weight), (m.pos_bias, lnp.bias)):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_dual_layer_norm_helpers_and_names():
    ln, lnp = _layer_norms()
    m = _copy_dual(ln, lnp)
    x, pos = torch.randn(B, N, D, generator=_g(1)), torch.randn(1, N, D, generator=_g(2))
    with torch.no_grad():
        torch.testing.assert_close(m.norm_pos(pos), lnp(pos), **TOL)
        torch.testing.assert_close(m.norm_tokens(x), ln(x), **TOL)
        torch.testing.assert_close(m.forward_with_term(x, lnp(pos)), ln(x) + lnp(pos), **TOL)
        # a transposed (non unit-stride) input, as a conv patch embedding produces, is accepted
        xt = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert xt.stride(-1) != 1
        torch.testing.assert_close(m(xt, pos)[0], ln(x) + lnp(pos), **TOL)
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias", "pos_weight", "pos_bias"]
    d = DualLayerNorm.from_layer_norm(ln)
    assert torch.equal(d.weight, ln.weight) and d.eps == ln.eps and d.pos_weight.eq(1).all()


def test_dual_layer_norm_drop_in_pre_norm_block():
    """A plain pre-norm block (timm layout) gets LaPE by swapping norm1; its checkpoint keys still load."""

    class PlainBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(D, eps=1e-6)
            self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
            self.norm2 = nn.LayerNorm(D, eps=1e-6)
            self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

        def forward(self, x, pos=None):
            if pos is None:
                a = self.norm1(x)
            else:
                a, pos = self.norm1(x, pos)
            x = x + self.attn(a, a, a, need_weights=False)[0]
            return x + self.mlp(self.norm2(x)), pos

    torch.manual_seed(0)
    blk = PlainBlock()
    _randomize(blk.norm1)
    sd = blk.state_dict()
    lape = copy.deepcopy(blk)
    lape.norm1 = DualLayerNorm.from_layer_norm(blk.norm1)
    result = lape.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["norm1.pos_bias", "norm1.pos_weight"] and not result.unexpected_keys
    x, pos = torch.randn(B, N, D, generator=_g(1)), torch.randn(1, N, D, generator=_g(2))
    with torch.no_grad():
        y, pos1 = lape(x, pos)
        a = blk.norm1(x) + F.layer_norm(pos, (D,), eps=1e-6)
        expect = x + blk.attn(a, a, a, need_weights=False)[0]
        expect = expect + blk.mlp(blk.norm2(expect))
    torch.testing.assert_close(y, expect, **TOL)
    torch.testing.assert_close(pos1, F.layer_norm(pos, (D,), eps=1e-6), **TOL)


@pytest.mark.parametrize("source", ["pos", "pos_term", "pooled_bias"])
def test_last_layer_norm_pe_matches_composition(source):
    ln, lnp = _layer_norms()
    m = LastLayerNormPE(D)
    with torch.no_grad():
        m.weight.copy_(ln.weight)
        m.bias.copy_(ln.bias)
        m.pos_weight.copy_(lnp.weight)
        m.pos_bias.copy_(lnp.bias)
    x = torch.randn(B, N, D, generator=_g(1), requires_grad=True)
    pos = torch.randn(1, N, D, generator=_g(2), requires_grad=True)
    x2, pos2 = x.detach().clone().requires_grad_(), pos.detach().clone().requires_grad_()
    expect_tokens = ln(x2) + lnp(pos2)
    expect_pool = expect_tokens.mean(dim=1)
    if source == "pos":
        tokens, pooled = m(x, pos), m(x, pos, pool=True)
    elif source == "pos_term":
        term = m.pos_term(pos)
        tokens, pooled = m(x, pos_term=term), m(x, pool=True, pos_term=term)
    else:
        tokens = m(x, pos)
        pooled = m(x, pool=True, pooled_bias=m.pooled_bias(pos))
    assert pooled.shape == (B, D)
    torch.testing.assert_close(tokens, expect_tokens, **TOL)
    torch.testing.assert_close(pooled, expect_pool, **TOL)
    gp = torch.randn(B, D, generator=_g(5))
    (pooled * gp).sum().backward()
    (expect_pool * gp).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(pos.grad, pos2.grad, **TOL)  # the PE term still routes gradient into pos
    for a, b in ((m.weight, ln.weight), (m.bias, ln.bias), (m.pos_weight, lnp.weight), (m.pos_bias, lnp.bias)):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_last_layer_norm_without_pos_is_layer_norm():
    ln, _ = _layer_norms()
    m = LastLayerNormPE.from_layer_norm(ln, use_pos=False)
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    x = torch.randn(B, N, D, generator=_g(1))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ln(x), **TOL)
        torch.testing.assert_close(m(x, pool=True), ln(x).mean(1), **TOL)
        torch.testing.assert_close(m(x, pos=torch.randn(N, D)), ln(x), **TOL)  # no LN'_last: pos ignored
    with pytest.raises(RuntimeError, match="use_pos=False"):
        m.pos_term(torch.randn(N, D))


# ----------------------------------------------------------------------------- PECache


def _params(*shapes):
    return [nn.Parameter(torch.randn(*s, generator=_g(i))) for i, s in enumerate(shapes)]


def _compute_counter():
    calls = []

    def compute(ts):
        calls.append(1)
        return sum(t.sum() for t in ts)

    return calls, compute


def test_cache_hits_until_a_tracked_tensor_changes():
    ps = _params((4, 3), (3,))
    cache = PECache()
    calls, compute = _compute_counter()
    with torch.no_grad():
        assert PECache.usable(ps)
        v1 = cache.get(ps, lambda: compute(ps))
        v2 = cache.get(ps, lambda: compute(ps))
        assert len(calls) == 1 and v1 is v2 and cache.hits == 1 and cache.filled
        ps[1].add_(1.0)  # version bump
        v3 = cache.get(ps, lambda: compute(ps))
        assert len(calls) == 2 and torch.allclose(v3, v1 + 3)
        cache.get(ps, lambda: compute(ps), extra=(2, 2))  # another extra key (e.g. grid)
        assert len(calls) == 3
    ps[0].data = ps[0].data.double()  # dtype and storage change without a version bump
    with torch.no_grad():
        cache.get(ps, lambda: compute(ps), extra=(2, 2))
    assert len(calls) == 4
    new = nn.Parameter(ps[0].detach().clone())  # same values, another tensor
    with torch.no_grad():
        cache.get([new, ps[1]], lambda: compute(ps), extra=(2, 2))
    assert len(calls) == 5
    cache.clear()
    assert not cache.filled


def test_cache_sees_fused_optimizer_steps():
    ps = _params((5,))
    cache = PECache()
    calls, compute = _compute_counter()
    opt = torch.optim.AdamW(ps, lr=0.1, fused=True)
    with torch.no_grad():
        cache.get(ps, lambda: compute(ps))
    version, steps = ps[0]._version, optimizer_step_count()
    ps[0].grad = torch.ones(5)
    opt.step()
    assert optimizer_step_count() == steps + 1
    with torch.no_grad():
        cache.get(ps, lambda: compute(ps))
    assert len(calls) == 2, f"stale after a fused step (version {version} -> {ps[0]._version})"


def test_cache_usable_rules():
    ps = _params((3,))
    assert not PECache.usable(ps)  # grad mode on and a tracked tensor requires grad
    with torch.no_grad():
        assert PECache.usable(ps)
    with torch.inference_mode():
        assert PECache.usable(ps)
    ps[0].requires_grad_(False)
    assert PECache.usable(ps)
    assert not cache_bypassed()


def test_cache_keeps_storages_alive_and_copies_start_empty():
    ps = _params((64,))
    cache = PECache()
    with torch.no_grad():
        cache.get(ps, lambda: ps[0] * 2)
    ptr = ps[0].data_ptr()
    ps[0].data = torch.randn(64)  # the old storage stays referenced by the cache entry: no address reuse
    assert ps[0].data_ptr() != ptr
    assert not copy.deepcopy(cache).filled
    assert not pickle.loads(pickle.dumps(cache)).filled
