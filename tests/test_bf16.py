"""bfloat16 paths: cached bf16 weights under autocast give autocast's numbers, and stay fresh."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import m2d.vit as vit
from conftest import REFERENCE, need
from m2d.models import create_model, param_groups
from m2d.train.config import TrainConfig
from m2d.train.loop import apply_update, make_optimizer

TINY = dict(img_size=[80, 208], patch_size=[16, 16], in_chans=1, embed_dim=64, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0, norm_pix_loss=True,
            layer_norm_eps=1e-6, mask_ratio=0.7)


def _plain_cast(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return param.to(dtype)


def _step(model, x, mask, bf16=True, target_offline=None):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        loss, pred, _ = model(x, mask=mask, target_offline=target_offline)
    loss.backward()
    return loss.detach(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    model = create_model('m2d', **TINY)
    return model, torch.randn(batch, 1, 80, 208, generator=g), model.draw_mask(batch, generator=g)


def test_cached_weights_equal_autocast_casts(monkeypatch):
    torch.manual_seed(0)
    model, x, mask = _inputs()
    twin = copy.deepcopy(model)
    loss, pred, grads = _step(model, x, mask)
    monkeypatch.setattr(vit, 'low_precision', _plain_cast)  # what autocast alone does
    loss_ref, pred_ref, grads_ref = _step(twin, x, mask)
    assert pred.dtype == torch.bfloat16
    assert torch.equal(loss, loss_ref) and torch.equal(pred, pred_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.equal(g, grads_ref[name]), name


def test_cache_follows_optimizer_steps_and_ema():
    torch.manual_seed(0)
    model, x, mask = _inputs()
    cfg = TrainConfig(model='m2d_vit_base')
    opt = make_optimizer(model, cfg, 1e-2, torch.device('cpu'))  # fused AdamW: no version bump
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(2):
        _step(model, x, mask)
        apply_update(model, opt, params, cfg.clip_grad, 0.9)
    # a model that never saw the cache, with the same weights, gives the same loss
    fresh = copy.deepcopy(model)
    vit.clear_low_precision_cache()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        loss_cached = model(x, mask=mask)[0]
        loss_fresh = fresh(x, mask=mask)[0]
        w = model.blocks[0].mlp.fc1.weight
        assert torch.equal(vit.low_precision(w, torch.bfloat16), w.to(torch.bfloat16))
        t = model.target_blocks[0].attn.qkv.weight  # moved by the EMA (foreach lerp)
        assert torch.equal(vit.low_precision(t, torch.bfloat16), t.to(torch.bfloat16))
    assert torch.equal(loss_cached, loss_fresh)


def test_cache_is_reused_and_float32_untouched():
    torch.manual_seed(0)
    model, x, mask = _inputs()
    w = model.blocks[0].attn.qkv.weight
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        model.encode(x)
        first = vit.low_precision(w, torch.bfloat16)
        model.encode(x)
        assert vit.low_precision(w, torch.bfloat16).data_ptr() == first.data_ptr()  # not cast again
    with torch.no_grad():
        w.mul_(2.0)  # any in-place change invalidates the copy
    assert torch.equal(vit.low_precision(w, torch.bfloat16), w.to(torch.bfloat16))
    # float32 runs never touch the cache: the output is that of plain torch ops
    lin = vit.Linear(8, 4)
    z = torch.randn(3, 8)
    assert torch.equal(lin(z), torch.nn.functional.linear(z, lin.weight, lin.bias))


@pytest.mark.parametrize('kind', ['m2d', 'msm_mae', 'm2d_s'])
def test_bf16_training_step_close_to_float32_reference(kind):
    """bf16 autocast on the reference training fixture: loss and gradients near the float32 goldens.

    Measured: loss within 1.3e-4 (relative), every gradient at cosine >= 0.99997.
    """
    gold = torch.load(need(REFERENCE / f'train_{kind}_tiny.pt'), weights_only=True)
    model = create_model(kind, **gold['config'])
    model.load_state_dict(gold['state_dict'], strict=True)
    loss, _, grads = _step(model, gold['x'], (gold['ids_restore'], gold['len_keep']),
                           target_offline=gold.get('target_offline'))
    assert abs(loss.item() - gold['loss'].item()) <= 2e-3 * abs(gold['loss'].item())
    cos = torch.nn.functional.cosine_similarity
    for name, g in gold['grads'].items():
        assert cos(grads[name].flatten(), g.flatten(), dim=0) >= 0.999, name


def test_apply_update_clips_as_clip_grad_norm():
    """Scaling only above the clip threshold gives exactly clip_grad_norm_'s parameters."""
    for clip in (0.5, 1e3, 0.0):
        torch.manual_seed(0)
        model, x, mask = _inputs()
        twin = copy.deepcopy(model)
        _step(model, x, mask, bf16=False)
        _step(twin, x, mask, bf16=False)
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=True)
        opt_ref = torch.optim.AdamW(param_groups(twin, 0.05), lr=1e-3, fused=True)
        params = [p for p in model.parameters() if p.requires_grad]
        norm = apply_update(model, opt, params, clip, 0.99)
        ref = [p for p in twin.parameters() if p.requires_grad]
        norm_ref = float(torch.nn.utils.clip_grad_norm_(ref, clip if clip > 0 else float('inf'), foreach=True))
        opt_ref.step()
        twin.update_target(0.99)
        assert norm == norm_ref
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), (clip, name)


def test_compile_blocks_runs_and_matches():
    torch.manual_seed(0)
    model, x, mask = _inputs()
    twin = copy.deepcopy(model).compile_blocks(backend='eager')
    assert set(twin.state_dict()) == set(model.state_dict())
    loss, pred, grads = _step(model, x, mask)
    loss_c, pred_c, grads_c = _step(twin, x, mask)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(pred_c, pred)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-3, atol=1e-5)


# ----- oneDNN-packed weights (bfloat16 inference on CPU) -------------------------------------


def _packed_layers():
    torch.manual_seed(0)
    mlp = vit.Mlp(64, 256).to(torch.bfloat16)
    assert vit.pack_weights(mlp) == 1 and mlp.fc1.pack and not mlp.fc2.pack  # only the widening layer
    mlp.fc2.pack = True  # (packed here to test it on its own)
    return mlp, torch.randn(3, 10, 64).to(torch.bfloat16)


def test_packed_linear_equals_f_linear_and_repacks_after_updates():
    mlp, x = _packed_layers()
    fc = mlp.fc2
    h = torch.randn(3, 10, 256).to(torch.bfloat16)
    threads = torch.get_num_threads()
    with torch.no_grad():
        y = fc(h)
        if fc.weight not in vit._PACKED:
            pytest.skip('oneDNN packed linear layers are not available on this CPU')
        torch.testing.assert_close(y, torch.nn.functional.linear(h, fc.weight, fc.bias), rtol=2 ** -7, atol=1e-3)
        try:
            torch.set_num_threads(1)  # one thread: the same float32 sums as F.linear, bit for bit
            assert torch.equal(fc(h), torch.nn.functional.linear(h, fc.weight, fc.bias))
            first = vit._PACKED[fc.weight][1]
            fc.weight.mul_(-2.0)  # an in-place change: the next call packs again
            assert torch.equal(fc(h), torch.nn.functional.linear(h, fc.weight, fc.bias))
            assert vit._PACKED[fc.weight][1] is not first
        finally:
            torch.set_num_threads(threads)
        # copies and saves of a packed model work (the packed weights live outside it) and pack anew
        twin = copy.deepcopy(mlp)
        assert twin.fc2.pack and torch.equal(twin.fc2(h), fc(h))
        buffer = io.BytesIO()
        torch.save(mlp, buffer)
        assert buffer.tell() > 0
    # with a gradient to take, the layer runs F.linear (the packed weight has no autograd)
    y = fc(h)
    y.float().sum().backward()
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0


def test_packed_mlp_fuses_gelu_at_least_as_accurately():
    mlp, x = _packed_layers()
    with torch.no_grad():
        fused = mlp(x)
        if mlp.fc1.weight not in vit._PACKED:
            pytest.skip('oneDNN packed linear layers are not available on this CPU')
        vit.pack_weights(mlp, False)
        plain = mlp(x)
        assert mlp.fc1.weight not in vit._PACKED
        exact = mlp.float()(x.float())  # the same weights in float32
    err_fused, err_plain = (fused.float() - exact).abs().mean(), (plain.float() - exact).abs().mean()
    assert not torch.equal(fused, plain)  # GELU ran on the float32 accumulator: one rounding less
    assert err_fused <= err_plain * 1.05, (err_fused, err_plain)


def test_runtime_bf16_packs_its_linear_layers(m2d_base_ckpt):
    from m2d import RuntimeM2D

    rt = RuntimeM2D(m2d_base_ckpt, bf16=True)
    layers = [m for m in rt.backbone.modules() if isinstance(m, vit.Linear)]
    assert len(layers) == 12 * 4 and [m.pack for m in layers] == [True, False, True, False] * 12  # qkv, fc1
    assert not any(m.pack for m in RuntimeM2D(m2d_base_ckpt).backbone.modules() if isinstance(m, vit.Linear))


def test_patch_embedding_as_matmul_equals_the_convolution():
    torch.manual_seed(0)
    pe = vit.PatchEmbed((16, 16), 1, 32)
    x = torch.randn(2, 1, 80, 96)
    conv = pe(x)  # float32: the convolution itself
    as_matmul = pe.matmul_over_patches(x, pe.proj.weight, pe.proj.bias)
    torch.testing.assert_close(as_matmul, conv, rtol=1e-5, atol=1e-5)  # same tokens, same order
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = pe(x)  # bf16 on CPU: the matmul path, on the cached bf16 weights
    assert y.dtype == torch.bfloat16 and y.shape == conv.shape == (2, 5 * 6, 32)
    torch.testing.assert_close(y.float(), conv, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert pe.proj.weight.grad.dtype == torch.float32 and pe.proj.weight.grad.abs().sum() > 0
    ragged = torch.randn(1, 1, 85, 100)  # past the last whole patch: dropped, as by the strided conv
    torch.testing.assert_close(pe.matmul_over_patches(ragged, pe.proj.weight, pe.proj.bias), pe(ragged),
                               rtol=1e-5, atol=1e-5)
