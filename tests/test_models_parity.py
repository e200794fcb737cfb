"""Pre-training models against the reference training-step goldens, and their checkpoints in RuntimeM2D."""

from __future__ import annotations

import argparse

import pytest
import torch

from conftest import REFERENCE, need
from m2d.checkpoint import save_checkpoint
from m2d.models import create_model, param_groups
from m2d.runtime import RuntimeM2D

KINDS = ['m2d', 'msm_mae', 'm2d_s']
TOL = 1e-4

TINY = dict(img_size=[80, 208], patch_size=[16, 16], in_chans=1, embed_dim=192, depth=2, num_heads=3,
            decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4.0, norm_pix_loss=True,
            layer_norm_eps=1e-6, mask_ratio=0.7)


def _load(kind: str) -> dict:
    return torch.load(need(REFERENCE / f'train_{kind}_tiny.pt'), weights_only=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope='module', params=KINDS)
def step(request):
    """One reference training step reproduced: (golden dict, model after backward, loss, pred, extras)."""
    kind = request.param
    gold = _load(kind)
    model = create_model(kind, **gold['config'])
    model.load_state_dict(gold['state_dict'], strict=True)
    loss, pred, extras = model(gold['x'], mask=(gold['ids_restore'], gold['len_keep']),
                               target_offline=gold.get('target_offline'))
    loss.backward()
    return kind, gold, model, loss, pred, extras


def test_loss_and_pred_match_reference(step):
    kind, gold, _, loss, pred, extras = step
    assert abs(loss.item() - gold['loss'].item()) <= TOL * abs(gold['loss'].item())
    assert pred.shape == gold['pred'].shape
    assert _rel(pred.detach(), gold['pred']) <= TOL
    if kind == 'm2d_s':
        for key in ('loss_online', 'loss_offline'):
            assert abs(extras[key].item() - gold[key].item()) <= TOL * abs(gold[key].item()), key


def test_grads_match_reference(step):
    _, gold, model, *_ = step
    params = dict(model.named_parameters())
    assert gold['grads'], 'the fixture lists gradients to compare'
    for name, g in gold['grads'].items():
        assert params[name].grad is not None, name
        assert _rel(params[name].grad, g) <= TOL, name
    for name in gold['params_without_grad']:
        assert params[name].grad is None, name
        assert not params[name].requires_grad, name


def test_ema_update_matches_reference(step):
    kind, gold, model, *_ = step
    if kind == 'msm_mae':
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.update_target(0.99)
        assert not model.has_target
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    assert model.has_target
    model.update_target(0.99)
    sd = model.state_dict()
    for name, t in gold['target_after_ema'].items():
        assert (sd[name] - t).abs().max() <= 1e-6 * max(1.0, float(t.abs().max())), name


def test_param_groups_follow_timm():
    model = create_model('m2d', **TINY)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd, d = {names[id(p)] for p in no_decay['params']}, {names[id(p)] for p in decay['params']}
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    assert {'cls_token', 'mask_token', 'blocks.0.attn.qkv.weight', 'patch_embed.proj.weight'} <= d
    assert {'blocks.0.attn.qkv.bias', 'norm.weight', 'decoder_norm.bias'} <= nd
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {'pos_embed', 'decoder_pos_embed', 'norm_stats', 'target_norm.weight'} <= frozen
    assert not (frozen & (nd | d))
    assert nd | d | frozen == set(names.values())


def test_init_and_random_masks():
    torch.manual_seed(0)
    model = create_model('m2d', **TINY, mask_type='structured')
    # the EMA target starts from its own random init, not a copy of the online encoder
    assert not torch.equal(model.target_blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert model.decoder_embed.bias.abs().max() == 0 and 0.01 < model.cls_token.std() < 0.03
    x = torch.randn(2, 1, 80, 208)
    for mask_type, extra in [('unstructured', {}), ('structured', {}), ('time_continuous', {'cont_mask': 3})]:
        model = create_model('m2d', **TINY, mask_type=mask_type, **extra)
        loss, pred, ex = model(x)
        assert torch.isfinite(loss) and pred.shape == (2, 65 - ex['len_keep'], 192), mask_type


def test_shorter_input_and_bad_arguments():
    model = create_model('m2d_s', **{**TINY, 'patch_size': [80, 4], 'off_emb_dim': 32, 'loss_off': 0.5})
    x = torch.randn(2, 1, 80, 120)  # 30 of the 52 time patches
    loss, pred, ex = model(x, target_offline=torch.randn(2, 30, 32))
    assert torch.isfinite(loss) and pred.shape == (2, 30 - ex['len_keep'], 192)
    with pytest.raises(ValueError, match='target_offline'):
        model(x, target_offline=torch.randn(2, 29, 32))
    with pytest.raises(ValueError, match='target_offline'):
        model(x)
    with pytest.raises(ValueError, match='unknown config keys'):
        create_model('m2d', **TINY, bogus=1)
    with pytest.raises(ValueError, match='kind'):
        create_model('mae', **TINY)


def test_trained_checkpoint_loads_in_runtime(tmp_path):
    torch.manual_seed(0)
    model = create_model('m2d', **TINY, norm_stats=(-6.5, 4.25))
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    x = torch.randn(4, 1, 80, 208)
    for _ in range(2):
        loss, _, _ = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target(0.99)
    path = tmp_path / 'm2d_vit_tiny-80x208p16x16p16k-240101-test' / 'checkpoint-1.pth'
    path.parent.mkdir()
    save_checkpoint({'model': model.state_dict(), 'epoch': 1, 'args': argparse.Namespace(model='m2d_vit_tiny')},
                    path)
    rt = RuntimeM2D(path, flat_features=True)
    assert rt.cfg.num_heads == 3 and rt.cfg.depth == 2
    assert rt.norm_stats.tolist() == pytest.approx([-6.5, 4.25])
    model.eval()
    lms = torch.randn(2, 1, 80, 208)
    with torch.no_grad():
        ours = model.encode(lms)[:, 1:]
        theirs = rt.encode_lms(lms)
    assert theirs.shape == ours.shape == (2, 65, 192)
    assert (theirs - ours).abs().max() <= 1e-5


def test_forward_encoder_with_nothing_masked_equals_encode():
    torch.manual_seed(1)
    model = create_model('msm_mae', **TINY).eval()
    x = torch.randn(2, 1, 80, 208)
    ids = torch.arange(65).expand(2, 65)
    with torch.no_grad():
        latent, ids_restore, len_keep = model.forward_encoder(x, (ids, 65))
        full = model.encode(x)
        part, _, kept = model.forward_encoder(x, (ids, 20))
    assert len_keep == 65 and torch.equal(ids_restore, ids)
    assert (latent - full).abs().max() <= 1e-5
    assert part.shape == (2, 21, 192) and kept == 20
