"""Model tier: mode semantics against an independent plain-PyTorch ViT (logits and gradients), the knobs of
MPVG Tables 5-6, the inference PE cache (equivalence, every invalidation path, never with grad), state-dict round
trip, torch.compile(fullgraph=True) in eval and train, the registry, param groups, resampling, intermediates."""

from __future__ import annotations

import copy

import pytest
import torch
from _vit_reference import RefViT, copy_into_ref, randomize_, ref_name

import mpvg_kernels as mk
from mpvg_kernels.models import (
    PAPER_PARAMS_M,
    VisionTransformer,
    create_model,
    format_param_table,
    list_models,
    param_groups,
    param_table,
)

SMALL = dict(img_size=8, patch_size=2, in_chans=3, num_classes=5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
ATOL, RTOL = 2e-5, 1e-4

# (pe, pool, model knobs, reference knobs)
CASES = [
    ("default", "cls", {}, {}),
    ("default", "avg", {}, {}),
    ("lape", "cls", {}, {}),
    ("lape", "cls", {"hierarchical": False}, {"hier": False}),
    ("lape", "avg", {}, {}),
    ("lape", "avg", {"hierarchical": False}, {"hier": False}),
    ("pvg", "avg", {}, {}),
    ("pvg", "cls", {}, {}),
    ("mpvg", "avg", {}, {}),
    ("mpvg", "cls", {}, {}),
    # MPVG Table 6: layer 0 included / non-hierarchical / no PE added to the input tokens
    ("mpvg", "avg", {"include_layer0": True}, {"layer0": True}),
    ("mpvg", "avg", {"hierarchical": False}, {"hier": False}),
    ("mpvg", "avg", {"add_pos_to_input": False}, {"x_plus_pe": False}),
    # LaPE for partial layers (LaPE Table 6; its T2T-ViT-7* row): only the first k blocks take a PE term
    ("lape", "cls", {"pe_layers": 2}, {"pe_layers": 2}),
    ("mpvg", "avg", {"pe_layers": 2}, {"pe_layers": 2}),
    # MPVG Table 5: which pos_k feeds the last LN
    ("mpvg", "avg", {"last_pos": 1}, {"last": 1}),
    ("mpvg", "avg", {"last_pos": -1}, {"last": 2}),
    ("mpvg", "cls", {"last_pos": 2, "hierarchical": False}, {"last": 2, "hier": False}),
    # MPVG Fig. 5-(b): PE at the last LN of a non-layer-wise model; LaPE with the MPVG last step
    ("default", "avg", {"last_pos": 0}, {"last": 0}),
    ("lape", "avg", {"last_pos": 0}, {"last": 0}),
    ("pvg", "avg", {"include_layer0": True, "hierarchical": False}, {"layer0": True, "hier": False}),
]


def _ids(case):
    pe, pool, kw, _ = case
    return f"{pe}-{pool}" + "".join(f"-{k}={v}" for k, v in kw.items())


def _pair(pe, pool, kw, rkw, cct=False, seed=0):
    extra = dict(block_style="cct", qkv_bias=False) if cct else {}
    torch.manual_seed(seed)
    model = VisionTransformer(pe=pe, pool=pool, **SMALL, **extra, **kw)
    randomize_(model, seed)
    ref = RefViT(
        pe, pool, img=8, patch=2, chans=3, dim=32, depth=3, heads=2, classes=5, cct=cct, qkv_bias=not cct, **rkw
    )
    copy_into_ref(model, ref)
    return model, ref


def _images(b=3, seed=1, size=8):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_logits_and_grads(model, ref, x):
    w = torch.randn(x.shape[0], 5, generator=torch.Generator().manual_seed(7))
    out = model(x)
    expect = ref(x)
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    (out * w).sum().backward()
    (expect * w).sum().backward()
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = theirs[ref_name(name)]
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_mode_matches_independent_reference(case):
    pe, pool, kw, rkw = case
    model, ref = _pair(pe, pool, kw, rkw)
    _check_logits_and_grads(model, ref, _images())
    # per-token features for dense heads: LN(x) (+ LN'_last(pos_k))
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(_images()), ref(_images(), everything=True)["features"], atol=ATOL, rtol=RTOL
        )


@pytest.mark.parametrize(
    "case",
    [("default", "cls", {}, {}), ("lape", "cls", {}, {}), ("mpvg", "avg", {}, {}), ("pvg", "cls", {}, {})],
    ids=_ids,
)
def test_cct_block_matches_reference(case):
    pe, pool, kw, rkw = case
    model, ref = _pair(pe, pool, kw, rkw, cct=True)
    _check_logits_and_grads(model, ref, _images())


@pytest.mark.parametrize("backend", mk.available_backends())
def test_every_backend_runs_the_model(backend):
    model, ref = _pair("mpvg", "avg", {}, {})
    with mk.use_backend(backend):
        _check_logits_and_grads(model, ref, _images())
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(_images()), ref(_images()), atol=ATOL, rtol=RTOL)


def test_modes_place_pe_where_the_table_says():
    """Structure: which blocks own a DualLayerNorm, whether the input gets +pos, the last-LN PE, the pooling."""
    expect = {
        "default": ((False, False, False), True, None, "cls"),
        "lape": ((True, True, True), False, None, "cls"),
        "pvg": ((False, True, True), True, None, "avg"),
        "mpvg": ((False, True, True), True, 0, "avg"),
    }
    for pe, (blocks, add_pos, last, pool) in expect.items():
        m = VisionTransformer(pe=pe, **SMALL)
        assert m.block_uses_pos == blocks and m.add_pos_to_input == add_pos
        assert m.last_pos == last and m.pool == pool and m.pe == pe
        assert (m.cls_token is not None) == (pool == "cls")
        assert m.pos_embed.shape == (1, 16 + (pool == "cls"), 32)
        names = m.pe_norm_parameter_names()
        assert len(names) == 2 * (sum(blocks) + (last is not None))
        assert isinstance(m.blocks[1].norm1, mk.layers.DualLayerNorm) == blocks[1]


def test_knob_errors():
    with pytest.raises(ValueError, match="layer-wise"):
        VisionTransformer(pe="default", hierarchical=False, **SMALL)
    with pytest.raises(ValueError, match="block 1 takes no PE"):
        VisionTransformer(pe="default", last_pos=1, **SMALL)
    with pytest.raises(ValueError, match="last_pos must be in"):
        VisionTransformer(pe="mpvg", last_pos=3, **SMALL)
    with pytest.raises(ValueError, match="pe must be one of"):
        VisionTransformer(pe="rope", **SMALL)
    with pytest.raises(ValueError, match="pool must be one of"):
        VisionTransformer(pe="mpvg", pool="max", **SMALL)
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        VisionTransformer(pe="mpvg", **SMALL)(_images(size=12))
    m = VisionTransformer(pe="default", add_pos_to_input=False, **SMALL)
    assert m.pos_embed is None  # no PE anywhere
    assert m(_images()).shape == (3, 5)


def test_forward_analysis():
    model, ref = _pair("mpvg", "avg", {}, {})
    x = _images()
    with torch.no_grad():
        it = model.forward_analysis(x)
        r = ref(x, everything=True)
        torch.testing.assert_close(it["logits"], model(x), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(it["logits"], r["logits"], atol=ATOL, rtol=RTOL)
        assert it["pos_terms"][0] is None and len(it["token_terms"]) == 3 and len(it["block_inputs"]) == 3
        for mine, theirs in zip(it["pos_terms"][1:], r["pos_terms"][1:], strict=True):
            torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=RTOL)
        for tok, term, a in zip(it["token_terms"], it["pos_terms"], it["attn_inputs"], strict=True):
            torch.testing.assert_close(a, tok if term is None else tok + term)
        torch.testing.assert_close(it["last_norm_input"], r["last_norm_input"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(it["features"], it["last_norm_output"] + it["last_pos_term"])
        ln = model.norm
        torch.testing.assert_close(
            it["last_pos_term"],
            torch.nn.functional.layer_norm(model.pos_embed, (32,), ln.pos_weight, ln.pos_bias, 1e-6),
        )
        assert it["grid"] == (4, 4) and it["num_prefix_tokens"] == 0


def test_grad_checkpointing_same_grads():
    a, _ = _pair("mpvg", "avg", {}, {})
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x = _images()
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_dynamic_img_size_and_set_input_size():
    model, _ = _pair("mpvg", "avg", {}, {})
    model.dynamic_img_size = True
    model.eval()
    x = _images(size=12)  # 6x6 grid instead of 4x4
    with torch.no_grad():
        cached = model(x)
        again = model(_images())  # back to the native grid: the cache is keyed by grid
    fresh = model(x).detach()
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, model(_images()).detach(), atol=1e-5, rtol=1e-4)
    fixed = copy.deepcopy(model)
    fixed.dynamic_img_size = False
    fixed.set_input_size(12)
    assert fixed.pos_embed.shape == (1, 36, 32) and fixed.default_cfg["input_size"] == (3, 12, 12)
    torch.testing.assert_close(fixed(x), fresh, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- inference PE cache


def _cache_model(pe="mpvg", pool="avg", **kw):
    model, _ = _pair(pe, pool, kw, {})
    return model.eval()


def _fresh(model, x):
    """The output computed without the cache (gradients enabled and parameters requiring grad)."""
    with torch.enable_grad():
        return model(x).detach()


def _cached(model, x):
    hits = model.pe_cache.hits
    with torch.no_grad():
        y = model(x)
    assert model.pe_cache.hits + model.pe_cache.misses > hits  # the cache was consulted
    return y


@pytest.mark.parametrize("pe,pool", [("mpvg", "avg"), ("mpvg", "cls"), ("lape", "cls"), ("pvg", "avg")])
def test_cache_matches_uncached(pe, pool):
    model = _cache_model(pe, pool)
    x = _images()
    y1 = _cached(model, x)
    misses = model.pe_cache.misses
    y2 = _cached(model, x)
    assert model.pe_cache.misses == misses and model.pe_cache.hits >= 1  # served from the cache
    torch.testing.assert_close(y1, _fresh(model, x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    with torch.no_grad():
        feats = model.forward_features(x)
    torch.testing.assert_close(feats, model.forward_features(x).detach(), atol=1e-5, rtol=1e-4)


def test_cache_pooled_bias_is_the_mean_pe_term():
    model = _cache_model()
    with torch.no_grad():
        state = model.pe_terms()
    term = model.norm.pos_term(model.pos_embed).detach()
    torch.testing.assert_close(state.pooled_bias, model.norm.bias.detach() + term.mean(dim=(0, 1)))
    torch.testing.assert_close(state.last_term, term)


def test_cache_never_used_with_grad():
    model = _cache_model()
    model.train()
    x = _images()
    for _ in range(2):
        out = model(x)
    assert model.pe_cache.hits == 0 and model.pe_cache.misses == 0 and not model.pe_cache.filled
    out.sum().backward()
    assert model.pos_embed.grad is not None and model.norm.pos_weight.grad.abs().sum() > 0
    assert model.blocks[2].norm1.pos_bias.grad.abs().sum() > 0
    # frozen parameters with grad mode on (e.g. saliency on the input): values need no grad, the cache serves
    for p in model.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    model(xg).sum().backward()
    assert model.pe_cache.hits >= 1 and xg.grad is not None


def _edit_then_expect_change(model, edit):
    x = _images()
    before = _cached(model, x)
    edit(model)
    after = _cached(model, x)
    torch.testing.assert_close(after, _fresh(model, x), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(after, before, atol=1e-4), "the edit did not change the output: test is vacuous"


def test_cache_invalidated_by_load_state_dict():
    model = _cache_model()
    other, _ = _pair("mpvg", "avg", {}, {}, seed=5)
    _edit_then_expect_change(model, lambda m: m.load_state_dict(other.state_dict()))


def test_cache_invalidated_by_load_state_dict_of_pe_only():
    model = _cache_model()

    def edit(m):
        sd = m.state_dict()
        sd["norm.pos_weight"] = sd["norm.pos_weight"] * 3
        sd["blocks.1.norm1.pos_bias"] = sd["blocks.1.norm1.pos_bias"] + 1
        m.load_state_dict(sd)

    _edit_then_expect_change(model, edit)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.5),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),  # fused steps do not bump _version
    ],
    ids=["sgd", "adamw-foreach", "adamw-fused"],
)
def test_cache_invalidated_by_optimizer_step(make_opt):
    model = _cache_model()
    pe_params = [model.pos_embed, model.norm.pos_weight, model.norm.pos_bias, model.blocks[1].norm1.pos_weight]
    opt = make_opt(pe_params)

    def step(m):
        m.train()
        m(_images(seed=3)).square().sum().backward()
        opt.step()
        m.eval()

    _edit_then_expect_change(model, step)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.pos_embed.mul_(1.5),
        lambda m: m.blocks[1].norm1.pos_weight.mul_(-2.0),
        lambda m: m.blocks[2].norm1.pos_bias.add_(1.0),
        lambda m: m.norm.pos_weight.mul_(3.0),
        lambda m: m.norm.bias.add_(1.0),
    ],
    ids=["pos_embed", "block1-pos_weight", "block2-pos_bias", "last-pos_weight", "last-bias"],
)
def test_cache_invalidated_by_inplace_edit(edit):
    def run(m):
        with torch.no_grad():
            edit(m)

    _edit_then_expect_change(_cache_model(), run)


def test_cache_after_data_edit_needs_clear():
    """``p.data`` writes bypass autograd's version counter: documented; clear_pe_cache() makes them visible."""
    model = _cache_model()
    x = _images()
    _cached(model, x)
    model.norm.pos_weight.data.mul_(3.0)
    model.clear_pe_cache()
    torch.testing.assert_close(_cached(model, x), _fresh(model, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_cache_follows_dtype_changes(dtype):
    model = _cache_model()
    x = _images()
    y32 = _cached(model, x)
    model.to(dtype)
    y = _cached(model, x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y, _fresh(model, x.to(dtype)), atol=2e-3 if dtype == torch.float16 else 1e-9, rtol=1e-3)
    model.float()
    back = _cached(model, x)
    torch.testing.assert_close(back, _fresh(model, x), atol=1e-5, rtol=1e-4)
    if dtype == torch.float64:  # float32 -> float64 -> float32 is exact
        torch.testing.assert_close(back, y32, atol=0, rtol=0)


def test_cache_half_and_double_methods():
    model = _cache_model()
    x = _images()
    _cached(model, x)
    model.half()
    assert _cached(model, x.half()).dtype == torch.float16
    with torch.no_grad():
        assert model.pe_terms().pos.dtype == torch.float16
    model.double()
    y = _cached(model, x.double())
    torch.testing.assert_close(y, _fresh(model, x.double()), atol=1e-9, rtol=1e-7)


def test_cache_with_inference_mode_then_training():
    model = _cache_model()
    x = _images()
    with torch.inference_mode():
        y_inf = model(x)
    y_ng = _cached(model, x)  # inference tensors are not reused outside inference mode
    torch.testing.assert_close(y_inf.clone(), y_ng)
    model.train()
    model(x).sum().backward()  # training after cached inference works
    assert model.pos_embed.grad is not None


def test_cache_is_not_state():
    model = _cache_model()
    _cached(model, _images())
    sd = model.state_dict()
    assert not any("cache" in k for k in sd)
    clone = copy.deepcopy(model)
    assert not clone.pe_cache.filled
    restored = VisionTransformer(pe="mpvg", pool="avg", **SMALL).eval()
    assert restored.load_state_dict(sd) is not None
    torch.testing.assert_close(_cached(restored, _images()), _cached(model, _images()), atol=0, rtol=0)
    assert set(restored.state_dict()) == set(sd)


# ----------------------------------------------------------------------------- torch.compile


@pytest.fixture
def tiny_mpvg():
    torch.manual_seed(0)
    m = VisionTransformer(
        pe="mpvg",
        pool="avg",
        img_size=8,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
        mlp_ratio=2.0,
    )
    randomize_(m, 3)
    return m


@pytest.mark.slow
def test_compile_fullgraph_eval_matches_eager(tiny_mpvg):
    torch._dynamo.reset()
    model = tiny_mpvg.eval()
    x = _images(b=2, size=8)
    with torch.no_grad():
        eager = model(x)
        hits = model.pe_cache.hits + model.pe_cache.misses
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
        out2 = compiled(x)
    assert model.pe_cache.hits + model.pe_cache.misses == hits  # compiled code bypasses the cache
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out2, eager, atol=1e-5, rtol=1e-4)
    # an in-place PE edit is seen by the compiled model (the chain is computed inside the graph)
    with torch.no_grad():
        model.norm.pos_bias.add_(1.0)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compile_fullgraph_train_matches_eager(tiny_mpvg):
    torch._dynamo.reset()
    model = tiny_mpvg.train()
    twin = copy.deepcopy(model)
    x = _images(b=2, size=8)
    eager = model(x)
    eager.square().sum().backward()
    compiled = torch.compile(twin, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)


# ----------------------------------------------------------------------------- registry and helpers


def test_registry_and_default_cfg():
    names = list_models()
    for n in (
        "deit_tiny_patch16_224",
        "deit_small_patch16_224",
        "deit_base_patch16_224",
        "vit_lite_7_4_32",
        "vit_digits",
    ):
        assert n in names
    assert list_models("deit_*_distilled_*") == ["deit_small_distilled_patch16_224", "deit_tiny_distilled_patch16_224"]
    assert [n for n in list_models("deit_*") if "distilled" not in n] == [
        "deit_base_patch16_224",
        "deit_small_patch16_224",
        "deit_tiny_patch16_224",
    ]
    m = create_model("vit_digits", pe="mpvg")
    cfg = m.default_cfg
    assert cfg["input_size"] == (1, 16, 16) and cfg["num_classes"] == 10 and len(cfg["mean"]) == 1
    assert m.pe == "mpvg" and m.pool == "avg" and cfg["pe"] == "mpvg" and cfg["architecture"] == "vit_digits"
    m = create_model("vit_digits", pe="lape", num_classes=4, img_size=24, pool="avg")
    assert m.default_cfg["input_size"] == (1, 24, 24) and m.num_classes == 4 and m.pool == "avg"
    assert m(torch.randn(2, 1, 24, 24)).shape == (2, 4)
    lite = create_model("vit_lite_7_4_32", pe="default")
    assert lite.block_style == "cct" and lite.pool == "cls" and lite.default_cfg["input_size"] == (3, 32, 32)
    assert lite.blocks[0].attn.qkv.bias is None and lite.num_classes == 100
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


def test_param_groups_exclusions():
    m = create_model("vit_digits", pe="mpvg")
    groups = param_groups(m, weight_decay=0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert "pos_embed" in no_decay and all(m.get_parameter(n).ndim >= 2 for n in decay)
    assert {"blocks.1.norm1.pos_weight", "norm.pos_bias", "head.bias"} <= no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} <= decay
    lape = create_model("vit_digits", pe="lape")
    assert "cls_token" in {
        n for n, p in lape.named_parameters() if any(p is q for q in param_groups(lape, 1)[1]["params"])
    }


def test_init_follows_deit():
    m = create_model("vit_digits", pe="mpvg")
    assert m.norm.pos_weight.eq(1).all() and m.blocks[1].norm1.pos_bias.eq(0).all()
    assert m.blocks[0].attn.qkv.bias.eq(0).all() and m.norm_eps == 1e-6 and m.blocks[1].norm1.eps == 1e-6
    assert 0.01 < m.pos_embed.std().item() < 0.03 and m.pos_embed.abs().max() < 0.1


def test_param_table_rows_and_paper_agreement():
    rows = param_table()
    assert {(r["model"], r["pe"]) for r in rows} >= set(PAPER_PARAMS_M)
    by = {(r["model"], r["pe"]): r for r in rows}
    assert by[("deit_tiny_patch16_224", "default")]["params"] == 5_717_416  # timm's deit_tiny_patch16_224
    assert by[("deit_tiny_patch16_224", "lape")]["pe_norm_params"] == 2 * 192 * 12
    assert by[("deit_tiny_patch16_224", "mpvg")]["pe_norm_params"] == 2 * 192 * 12
    for key in PAPER_PARAMS_M:  # the paper prints 3 decimals (M): agreement to about one unit of the last digit
        assert abs(by[key]["diff_vs_paper"]) <= 1100, (key, by[key])
    text = format_param_table(rows)
    assert "deit_base_patch16_224" in text and "vit_digits" in text


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(patch_size=0), "patch_size"),
        (dict(num_classes=-1), "num_classes"),
        (dict(embed_dim=0), "embed_dim"),
        (dict(num_heads=0), "num_heads"),
        (dict(in_chans=0), "in_chans"),
        (dict(img_size=(16, 0)), "img_size"),
        (dict(depth=0), "depth"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
    ],
)
def test_bad_sizes_are_clear_errors(kwargs, name):
    """A size that cannot build a model is a ValueError naming it, not a ZeroDivisionError or a silent model."""
    with pytest.raises(ValueError, match=name):
        create_model("vit_digits", **kwargs)
    model = create_model("vit_digits")
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-3)
