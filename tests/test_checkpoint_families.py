"""Every released checkpoint family loads through RuntimeM2D with the right geometry and values.

The files are built here with the official key layout (``official_keys.json``: encoder, decoder,
EMA target, offline predictor, norm_stats) at small widths, in the containers the releases use,
and the features are checked against an independent functional ViT written in this file.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES, need
from m2d import RuntimeM2D
from m2d.checkpoint import (DEFAULT_NORM_STATS, CheckpointError, UnsafeCheckpointError, export_encoder,
                            load_checkpoint)

D, DEPTH, DEC_D = 64, 2, 32
HEADS = max(1, D // 64)  # what the loader infers for a non-standard width
SR = 16000
FULL_LAYOUT = 'm2d_s_vit_base-80x608p80x2'  # the official layout with every part (offline_predictor too)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope='module')
def layout() -> dict[str, list[int]]:
    return json.loads(need(FIXTURES / 'official_keys.json').read_text())[FULL_LAYOUT]


# ---------------------------------------------------------------------------------------------
# a small generator in the official key layout


def _part(key: str) -> str:
    if key == 'norm_stats':
        return 'norm_stats'
    if key.startswith(('decoder_', 'mask_token')):
        return 'decoder'
    if key.startswith('target_'):
        return 'target'
    if key.startswith('offline_predictor'):
        return 'offline'
    return 'encoder'


def make_sd(layout, geometry, parts=('encoder', 'decoder', 'target', 'norm_stats'), *, pixel_pred=False,
            norm_stats=(-8.1, 4.3), seed=0) -> dict[str, torch.Tensor]:
    """A state dict with the official keys, scaled to D/DEPTH, for ``geometry = ((F, T), (ph, pw))``."""
    (f, t), (ph, pw) = geometry
    n_tokens = (f // ph) * (t // pw) + 1
    dims = {768: D, 2304: 3 * D, 3072: 4 * D, 512: DEC_D, 1536: 3 * DEC_D, 2048: 4 * DEC_D}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout.items():
        part = _part(key)
        if part not in parts:
            continue
        if key.startswith(('blocks.', 'target_blocks.')) and int(key.split('.')[1]) >= DEPTH:
            continue
        if key.startswith('decoder_blocks.') and int(key.split('.')[1]) >= 1:
            continue
        if key == 'norm_stats':
            sd[key] = torch.tensor(norm_stats, dtype=torch.float32)
            continue
        if key == 'pos_embed':
            shape = [1, n_tokens, D]
        elif key == 'decoder_pos_embed':
            shape = [1, n_tokens, DEC_D]
        elif key == 'patch_embed.proj.weight':
            shape = [D, 1, ph, pw]
        elif key.startswith('decoder_pred.'):
            out = ph * pw if pixel_pred else D  # MSM-MAE predicts pixels, M2D predicts target features
            shape = [out, DEC_D] if key.endswith('weight') else [out]
        else:
            shape = [dims.get(s, s) for s in shape]
        v = torch.randn(shape, generator=gen)
        if key.endswith('.weight') and len(shape) == 1:  # LayerNorm scale
            v = 1.0 + 0.1 * v
        elif key.endswith('.bias'):
            v = 0.05 * v
        elif key in ('pos_embed', 'decoder_pos_embed'):
            v = 0.5 * v
        elif len(shape) >= 2 and key not in ('cls_token', 'mask_token'):
            v = v / math.sqrt(math.prod(shape[1:]))
        sd[key] = v.float()
    return sd


def encoder_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if _part(k) in ('encoder', 'norm_stats')}


def save_full(path: Path, sd, epoch=300) -> Path:
    """The released container: ``{'model': sd, 'epoch': int, 'args': argparse.Namespace}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': sd, 'epoch': epoch, 'args': argparse.Namespace(model='m2d', mask_ratio=0.7)}, path)
    return path


def save_bare(path: Path, sd) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(collections.OrderedDict(sd), path)
    return path


# ---------------------------------------------------------------------------------------------
# an independent reference: functional ViT on the raw tensors, reference-style chunking


def ref_tokens(sd, lms: torch.Tensor, patch, heads=HEADS) -> list[torch.Tensor]:
    """Per-layer patch tokens ``[B, Fp*Tp', D]`` (no cls) of one chunk, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(lms.double(), sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=patch)
    B, Dm, fp, tpp = x.shape
    pos = sd['pos_embed'][0, 1:].reshape(fp, -1, Dm)[:, :tpp]  # the stored table, first time-columns
    x = (x.permute(0, 2, 3, 1) + pos).reshape(B, fp * tpp, Dm)
    cls = (sd['cls_token'] + sd['pos_embed'][:, :1]).expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1)
    N, dh = x.shape[1], Dm // heads
    layers = []
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    for i in range(depth):
        p = f'blocks.{i}.'
        h = F.layer_norm(x, (Dm,), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], 1e-6)
        q, k, v = F.linear(h, sd[p + 'attn.qkv.weight'], sd[p + 'attn.qkv.bias']).reshape(B, N, 3, heads, dh).unbind(2)
        att = (torch.einsum('bnhd,bmhd->bhnm', q, k) / math.sqrt(dh)).softmax(-1)
        o = torch.einsum('bhnm,bmhd->bnhd', att, v).reshape(B, N, Dm)
        x = x + F.linear(o, sd[p + 'attn.proj.weight'], sd[p + 'attn.proj.bias'])
        h = F.layer_norm(x, (Dm,), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'])),
                         sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'])
        layers.append(x)
    layers[-1] = F.layer_norm(x, (Dm,), sd['norm.weight'], sd['norm.bias'], 1e-6)
    return [layer[:, 1:] for layer in layers]


def stack(x: torch.Tensor, fp: int) -> torch.Tensor:
    """``b (f t) d -> b t (f d)``."""
    B, L, Dm = x.shape
    return x.reshape(B, fp, L // fp, Dm).permute(0, 2, 1, 3).reshape(B, L // fp, fp * Dm)


def ref_features(sd, lms, geometry, flat=False) -> torch.Tensor:
    """Reference chunking: chunks of T frames (the conv keeps whole patches), remainder padded to pw."""
    (f, t), (ph, pw) = geometry
    n_chunks = -(-lms.shape[-1] // t)
    pad = (pw - lms.shape[-1] % t % pw) % pw
    lms = F.pad(lms, (0, pad))
    out = []
    for i in range(n_chunks):
        tokens = ref_tokens(sd, lms[..., i * t:(i + 1) * t], (ph, pw))[-1]
        out.append(tokens if flat else stack(tokens, f // ph))
    return torch.cat(out, dim=1)


def normalized(rt: RuntimeM2D, wav: torch.Tensor, stats) -> torch.Tensor:
    return (rt.to_feature(wav) - stats[0]) / stats[1]


def close(a: torch.Tensor, b: torch.Tensor, tol=1e-4) -> bool:
    return a.shape == b.shape and (a.double() - b.double()).abs().max().item() < tol


@pytest.fixture(scope='module')
def wav() -> torch.Tensor:
    return torch.randn(2, SR, generator=torch.Generator().manual_seed(1)) * 0.1  # 1 s, 101 frames


G608 = ((80, 608), (16, 16))
G200 = ((80, 200), (16, 4))
G1001 = ((80, 1001), (16, 16))


# ---------------------------------------------------------------------------------------------
# the families


def test_full_m2d_checkpoint(tmp_path, layout, wav):
    sd = make_sd(layout, G608)
    path = save_full(tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-300.pth', sd)
    ckpt = load_checkpoint(path)
    assert ckpt.meta['epoch'] == 300 and isinstance(ckpt.meta['args'], argparse.Namespace)
    assert ckpt.vit.input_size == (80, 608) and ckpt.vit.patch_size == (16, 16)
    assert ckpt.vit.embed_dim == D and ckpt.vit.depth == DEPTH
    assert any(k.startswith('decoder_blocks.') for k in ckpt.dropped)
    assert any(k.startswith('target_blocks.') for k in ckpt.dropped) and 'mask_token' in ckpt.dropped

    rt = RuntimeM2D(path)
    assert rt.sample_rate == SR and rt.norm_stats.tolist() == pytest.approx([-8.1, 4.3])
    assert rt.to_feature(wav).shape == (2, 1, 80, 101)
    x = rt.encode(wav)
    assert x.shape == (2, 7, 5 * D)  # 101 frames -> padded to 112 -> 7 steps
    assert close(x, ref_features(sd, normalized(rt, wav, (-8.1, 4.3)), G608))
    assert close(rt.get_scene_embeddings(wav), x.mean(1))


def test_msm_mae_pixel_decoder_no_norm_stats(tmp_path, layout, wav):
    sd = make_sd(layout, G608, parts=('encoder', 'decoder'), pixel_pred=True)
    assert sd['decoder_pred.weight'].shape == (16 * 16, DEC_D)
    path = save_full(tmp_path / 'msm_mae_vit_base-80x608p16x16-220924-mr75' / 'checkpoint-300.pth', sd)
    rt = RuntimeM2D(path)
    ckpt = load_checkpoint(path)
    assert 'decoder_pred.weight' in ckpt.dropped and not ckpt.has_norm_stats
    assert tuple(rt.norm_stats.tolist()) == pytest.approx(DEFAULT_NORM_STATS) == (-7.1, 4.2)
    lms = rt.to_feature(wav)
    assert close(rt.normalize_batch(lms), (lms + 7.1) / 4.2, 1e-5)
    assert close(rt.encode(wav), ref_features(sd, (lms + 7.1) / 4.2, G608))


@pytest.mark.parametrize('name,geometry,hz', [
    ('m2d_s_vit_base-80x400p80x2-230201', ((80, 400), (80, 2)), 50),
    ('m2d_s_vit_base-80x208p80x4-230220', ((80, 208), (80, 4)), 25),
])
def test_m2d_s_speech_patches(tmp_path, layout, name, geometry, hz):
    sd = make_sd(layout, geometry, parts=('encoder', 'decoder', 'target', 'offline', 'norm_stats'))
    path = save_full(tmp_path / name / 'checkpoint-1000.pth', sd, epoch=1000)
    rt = RuntimeM2D(path)
    assert 'offline_predictor.weight' in load_checkpoint(path).dropped
    assert rt.frame_rate == hz and rt.feature_d == D  # one frequency patch: D per time step
    pw = geometry[1][1]
    wav3 = torch.randn(1, 3 * SR, generator=torch.Generator().manual_seed(2)) * 0.1  # 301 frames
    x = rt.encode(wav3)
    assert x.shape == (1, -(-301 // pw), D)  # 151 steps at 50 Hz, 76 at 25 Hz
    assert close(x, ref_features(sd, normalized(rt, wav3, (-8.1, 4.3)), geometry))
    emb, ts = rt.get_timestamp_embeddings(wav3)
    assert emb.shape == x.shape and ts.shape == (1, x.shape[1])
    assert torch.allclose(ts[0, 1:] - ts[0, :-1], torch.full((x.shape[1] - 1,), 1000.0 / hz))


@pytest.mark.parametrize('name', ['m2d_x_vit_base-80x608p16x16-230712', 'm2d_as_vit_base-80x608p16x16-240213'])
@pytest.mark.parametrize('offline', [True, False])
def test_m2d_x_and_as(tmp_path, layout, wav, name, offline):
    parts = ('encoder', 'decoder', 'target', 'norm_stats') + (('offline',) if offline else ())
    sd = make_sd(layout, G608, parts=parts, seed=3)
    path = save_full(tmp_path / name / 'checkpoint-300.pth', sd)
    ckpt = load_checkpoint(path)
    assert ('offline_predictor.weight' in ckpt.dropped) == offline
    rt = RuntimeM2D(checkpoint=ckpt)
    assert close(rt.encode(wav), ref_features(sd, normalized(rt, wav, (-8.1, 4.3)), G608))


@pytest.mark.parametrize('proj', ['mlp', 'linear'])
def test_m2d_clap(tmp_path, layout, wav, proj):
    sd = make_sd(layout, G608, seed=4)
    gen = torch.Generator().manual_seed(5)
    if proj == 'mlp':  # Linear(D, D) + ReLU + Linear(D, 48)
        clap = {'audio_proj.0.weight': torch.randn(D, D, generator=gen) / 8, 'audio_proj.0.bias': torch.randn(D, generator=gen) / 8,
                'audio_proj.2.weight': torch.randn(48, D, generator=gen) / 8, 'audio_proj.2.bias': torch.randn(48, generator=gen) / 8}
    else:
        clap = {'audio_proj.weight': torch.randn(48, D, generator=gen) / 8, 'audio_proj.bias': torch.randn(48, generator=gen) / 8}
    clap.update({'text_proj.weight': torch.randn(48, 96, generator=gen) / 8, 'text_proj.bias': torch.randn(48, generator=gen) / 8,
                 'logit_scale': torch.tensor(math.log(1 / 0.07))})
    path = save_full(tmp_path / 'm2d_clap_vit_base-80x608p16x16-240128' / 'checkpoint-30.pth', {**sd, **clap}, epoch=30)
    rt = RuntimeM2D(path)
    assert float(rt.logit_scale) == pytest.approx(math.log(1 / 0.07))

    tokens = ref_features(sd, normalized(rt, wav, (-8.1, 4.3)), G608, flat=True)  # [B, Fp*T', D]
    m = tokens.mean(1)
    if proj == 'mlp':
        h = F.relu(F.linear(m, clap['audio_proj.0.weight'].double(), clap['audio_proj.0.bias'].double()))
        expect = F.linear(h, clap['audio_proj.2.weight'].double(), clap['audio_proj.2.bias'].double())
    else:
        expect = F.linear(m, clap['audio_proj.weight'].double(), clap['audio_proj.bias'].double())
    a = rt.encode_clap_audio(wav)
    assert a.shape == (2, 48) and close(a, expect)
    text = torch.randn(3, 96, generator=gen)
    assert close(rt.encode_clap_text(text), F.linear(text, clap['text_proj.weight'], clap['text_proj.bias']), 1e-5)


def test_clap_methods_refuse_non_clap_file(tmp_path, layout, wav):
    path = save_full(tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-300.pth', make_sd(layout, G608))
    rt = RuntimeM2D(path)
    with pytest.raises(ValueError, match='audio_proj'):
        rt.encode_clap_audio(wav)


@pytest.mark.parametrize('container', ['bare', 'model'])
def test_encoder_only(tmp_path, layout, wav, container):
    full = make_sd(layout, G608, seed=6)
    enc = encoder_part(full)
    folder = tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7_enconly'
    path = (save_bare if container == 'bare' else save_full)(folder / 'checkpoint-300.pth', enc)
    ckpt = load_checkpoint(path)  # an OrderedDict loads without trust
    assert ckpt.dropped == [] and ckpt.vit.input_size == (80, 608)
    full_path = save_full(tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-300.pth', full)
    assert torch.equal(RuntimeM2D(path).encode(wav), RuntimeM2D(full_path).encode(wav))


def _evar_file(path: Path, sd, head_in: int, classes: int, seed=7) -> tuple[Path, dict]:
    gen = torch.Generator().manual_seed(seed)
    head = {'module.head.norm.running_mean': torch.randn(head_in, generator=gen),
            'module.head.norm.running_var': torch.rand(head_in, generator=gen) + 0.5,
            'module.head.norm.num_batches_tracked': torch.tensor(1000),
            'module.head.mlp.mlp.0.weight': torch.randn(classes, head_in, generator=gen) * 0.1,
            'module.head.mlp.mlp.0.bias': torch.randn(classes, generator=gen) * 0.1}
    full = {'module.ar.runtime.backbone.' + k: v for k, v in encoder_part(sd).items()}
    full['module.ar.runtime.to_spec.mel_basis'] = torch.rand(80, 201)  # the reference front-end's buffers
    full.update(head)
    return save_bare(path, full), head


def _logits(x_mean, head):
    rm, rv = head['module.head.norm.running_mean'].double(), head['module.head.norm.running_var'].double()
    z = (x_mean - rm) / torch.sqrt(rv + 1e-5)
    return F.linear(z, head['module.head.mlp.mlp.0.weight'].double(), head['module.head.mlp.mlp.0.bias'].double())


def test_evar_finetuned_stacked_head_80x1001(tmp_path, layout):
    sd = make_sd(layout, G1001, parts=('encoder', 'norm_stats'), seed=8)
    folder = tmp_path / 'm2d_vit_base-80x1001p16x16-221006-mr7_as_46ab246d'
    path, head = _evar_file(folder / 'weights_ep69it3124-0.47998.pth', sd, 5 * D, 7)
    rt = RuntimeM2D(path, num_classes=7)
    assert not rt.flat_features and rt.cfg.input_size == (80, 1001) and rt.cfg.grid_size == (5, 62)
    wav10 = torch.randn(2, 10 * SR, generator=torch.Generator().manual_seed(9)) * 0.1  # 1001 frames: one unit
    feats = ref_features(sd, normalized(rt, wav10, (-8.1, 4.3)), G1001)
    assert feats.shape == (2, 62, 5 * D)
    x = rt.encode(wav10)
    assert close(x, feats)
    logits = rt(wav10)
    assert logits.shape == (2, 7) and close(logits, _logits(feats.mean(1), head), 1e-3)
    with pytest.raises(ValueError, match='num_classes'):
        RuntimeM2D(path, num_classes=5)


def test_evar_finetuned_flat_head(tmp_path, layout, wav):
    sd = make_sd(layout, G608, parts=('encoder', 'norm_stats'), seed=10)
    path, head = _evar_file(tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7_esc50' / 'weights_ep1.pth', sd, D, 4)
    rt = RuntimeM2D(path, num_classes=4)
    assert rt.flat_features and rt.feature_d == D  # the head takes D inputs, so features are flat
    feats = ref_features(sd, normalized(rt, wav, (-8.1, 4.3)), G608, flat=True)
    assert close(rt.encode(wav), feats)
    assert close(rt(wav), _logits(feats.mean(1), head), 1e-3)


def test_32k(tmp_path, layout):
    sd = encoder_part(make_sd(layout, G608, seed=11))
    path = save_bare(tmp_path / 'm2d_as_vit_base-80x608p16x16p32k-240413_enconly' / 'checkpoint-100.pth', sd)
    rt = RuntimeM2D(path)
    assert rt.sample_rate == 32000 and rt.to_spec.config.n_fft == 800 and rt.to_spec.config.hop_length == 320
    assert rt.to_spec.config.f_max == 16000
    wav32 = torch.randn(1, 32000, generator=torch.Generator().manual_seed(12)) * 0.1
    lms = rt.to_feature(wav32)
    assert lms.shape == (1, 1, 80, 101)  # 1 + 32000 // 320
    assert rt.to_feature(wav32[:, :16000]).shape[-1] == 51
    assert close(rt.encode(wav32), ref_features(sd, (lms + 8.1) / 4.3, G608))


@pytest.mark.parametrize('name,geometry,extra', [
    ('m2d_vit_base-80x200p16x4-230529', G200, 57),
    ('m2d_vit_base-80x1001p16x16-221006-mr7', G1001, 37),
])
def test_chunking(tmp_path, layout, name, geometry, extra):
    sd = make_sd(layout, geometry, parts=('encoder', 'norm_stats'), seed=12)
    rt = RuntimeM2D(save_bare(tmp_path / name / 'checkpoint-1.pth', sd))
    (f, unit), (ph, pw) = geometry
    lms = torch.randn(2, 1, 80, 2 * unit + extra, generator=torch.Generator().manual_seed(13))
    # by hand: two unit chunks, then the remainder right-padded to a multiple of the patch width
    rest = F.pad(lms[..., 2 * unit:], (0, (pw - extra % pw) % pw))
    parts = [lms[..., :unit], lms[..., unit:2 * unit], rest]
    by_hand = torch.cat([rt._stack(rt.backbone(c)[:, 1:]) for c in parts], dim=1)
    x = rt.encode_lms(lms)
    steps = 2 * (unit // pw) + -(-extra // pw)
    assert x.shape == (2, steps, 5 * D)
    assert close(x, by_hand, 1e-5)
    assert close(x, ref_features(sd, lms, geometry))
    layers = rt.encode_lms(lms, return_layers=True)
    assert len(layers) == DEPTH and close(layers[-1], x, 1e-6)
    # exactly one unit (a 10-s clip for 80x1001) gives the unit's patches, nothing more
    assert rt.encode_lms(lms[..., :unit]).shape == (2, unit // pw, 5 * D)


@pytest.mark.parametrize('extra', [992, 995, 1000])
def test_chunking_remainder_near_a_1001_frame_unit(tmp_path, layout, extra):
    # a remainder whose padding to whole patches would pass the unit's 62 patches keeps 62, as the reference
    sd = make_sd(layout, G1001, parts=('encoder', 'norm_stats'), seed=16)
    rt = RuntimeM2D(save_bare(tmp_path / 'm2d_vit_base-80x1001p16x16-221006-mr7' / 'checkpoint-1.pth', sd))
    lms = torch.randn(1, 1, 80, 1001 + extra, generator=torch.Generator().manual_seed(17))
    x = rt.encode_lms(lms)
    assert x.shape == (1, 62 + 62, 5 * D)
    assert close(x, ref_features(sd, lms, G1001))


def test_short_input_uses_first_pos_embed_columns(tmp_path, layout):
    sd = make_sd(layout, G200, parts=('encoder', 'norm_stats'), seed=14)
    rt = RuntimeM2D(save_bare(tmp_path / 'm2d_vit_base-80x200p16x4-230529' / 'checkpoint-1.pth', sd))
    lms = torch.randn(1, 1, 80, 50, generator=torch.Generator().manual_seed(15))  # 13 of 50 time patches
    x = rt.encode_lms(lms)
    assert x.shape == (1, 13, 5 * D)
    assert close(x, ref_features(sd, lms, G200))
    # a different pos_embed beyond the first 13 columns changes nothing
    sd2 = dict(sd)
    pos = sd['pos_embed'].clone()
    pos[0, 1:].view(5, 50, D)[:, 13:] += 3.0
    sd2['pos_embed'] = pos
    rt2 = RuntimeM2D(save_bare(tmp_path / 'b' / 'm2d_vit_base-80x200p16x4-230529' / 'checkpoint-1.pth', sd2))
    assert torch.equal(rt2.encode_lms(lms), x)


# ---------------------------------------------------------------------------------------------
# geometry checks, names, safety, export, logs


def test_geometry_mismatch_patch(tmp_path, layout):
    sd = make_sd(layout, G200, parts=('encoder',))
    path = save_bare(tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-300.pth', sd)
    with pytest.raises(CheckpointError, match='patch 16x16') as e:
        RuntimeM2D(path)
    assert str(path) in str(e.value) and '16x4' in str(e.value)


def test_geometry_mismatch_input_size(tmp_path, layout):
    sd = make_sd(layout, ((80, 304), (16, 16)), parts=('encoder',))
    path = save_bare(tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-300.pth', sd)
    with pytest.raises(CheckpointError, match='80x608') as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and '80x304' in str(e.value)


def test_unparsed_name_takes_geometry_from_tensors(tmp_path, layout, caplog):
    sd = make_sd(layout, G200, parts=('encoder', 'norm_stats'), seed=16)
    path = save_bare(tmp_path / 'my_weights' / 'model.pth', sd)
    with caplog.at_level(logging.WARNING, logger='m2d'):
        rt = RuntimeM2D(path)
    assert rt.cfg.input_size == (80, 200) and rt.cfg.patch_size == (16, 4) and rt.sample_rate == 16000
    assert any('folder name' in r.getMessage() for r in caplog.records)
    lms = torch.randn(1, 1, 80, 120, generator=torch.Generator().manual_seed(17))
    assert close(rt.encode_lms(lms), ref_features(sd, lms, G200))


class CustomStateDict(collections.OrderedDict):
    """Not allow-listed: unpickling it needs code from this module."""


def test_unsafe_pickle_needs_trust(tmp_path, layout, wav):
    sd = encoder_part(make_sd(layout, G608, seed=18))
    path = tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7_enconly' / 'checkpoint-300.pth'
    path.parent.mkdir(parents=True)
    torch.save(CustomStateDict(sd), path)
    with pytest.raises(UnsafeCheckpointError, match='trust') as e:
        RuntimeM2D(path)
    assert str(path) in str(e.value) and 'CustomStateDict' in str(e.value)
    rt = RuntimeM2D(path, trust=True)
    assert close(rt.encode(wav), ref_features(sd, normalized(rt, wav, (-8.1, 4.3)), G608))


@pytest.mark.parametrize('content', [b'', b'hello, not a weight file\n'])
def test_unreadable_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-300.pth'
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='not a readable') as e:
        load_checkpoint(path)
    assert not isinstance(e.value, UnsafeCheckpointError) and str(path) in str(e.value)
    with pytest.raises(CheckpointError, match='no such'):
        load_checkpoint(tmp_path / 'absent.pth')


@pytest.mark.parametrize('kind', ['evar_1001', 'clap_32k'])
def test_safetensors_export_round_trip(tmp_path, layout, kind):
    if kind == 'evar_1001':
        sd = make_sd(layout, G1001, parts=('encoder', 'norm_stats'), seed=19)
        src, _ = _evar_file(tmp_path / 'm2d_vit_base-80x1001p16x16-221006-mr7_as_46ab246d' / 'w.pth', sd, 5 * D, 3)
        kw, sr = {'num_classes': 3}, SR
    else:
        sd = make_sd(layout, G608, seed=20)
        clap = {'audio_proj.0.weight': torch.randn(D, D) / 8, 'audio_proj.0.bias': torch.zeros(D),
                'audio_proj.2.weight': torch.randn(32, D) / 8, 'audio_proj.2.bias': torch.zeros(32),
                'logit_scale': torch.tensor(2.0)}
        src = save_full(tmp_path / 'm2d_clap_vit_base-80x608p16x16p32k-240128' / 'checkpoint-30.pth', {**sd, **clap})
        kw, sr = {}, 32000
    dst = export_encoder(src, tmp_path / 'exported' / 'encoder.safetensors')
    a, b = RuntimeM2D(src, **kw), RuntimeM2D(dst, **kw)
    assert b.sample_rate == a.sample_rate == sr and b.cfg == a.cfg
    assert torch.equal(a.norm_stats, b.norm_stats)
    wav = torch.randn(1, 2 * sr, generator=torch.Generator().manual_seed(21)) * 0.1
    assert torch.equal(a.encode(wav), b.encode(wav))
    assert torch.equal(a(wav), b(wav))
    if kind == 'clap_32k':
        assert torch.equal(a.encode_clap_audio(wav), b.encode_clap_audio(wav))
    assert load_checkpoint(dst).dropped == []


def test_unused_keys_one_line_summary(tmp_path, layout, caplog):
    sd = make_sd(layout, G608, parts=('encoder', 'decoder', 'target', 'offline', 'norm_stats'))
    path = save_full(tmp_path / 'm2d_x_vit_base-80x608p16x16-230712' / 'checkpoint-300.pth', sd)
    n_unused = sum(_part(k) in ('decoder', 'target', 'offline') for k in sd)
    with caplog.at_level(logging.INFO, logger='m2d'):
        load_checkpoint(path)
    lines = [r.getMessage() for r in caplog.records if 'dropped' in r.getMessage()]
    assert len(lines) == 1 and '\n' not in lines[0]
    assert f'dropped {n_unused}' in lines[0]
    for group in ('decoder_blocks', 'target_blocks', 'offline_predictor', 'mask_token'):
        assert group in lines[0]
    caplog.clear()
    enc_path = save_bare(tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7_enconly' / 'checkpoint-300.pth',
                         encoder_part(sd))
    with caplog.at_level(logging.INFO, logger='m2d'):
        load_checkpoint(enc_path)
    assert not [r for r in caplog.records if 'dropped' in r.getMessage()]


def test_bf16_mode_small_model(tmp_path, layout, wav):
    sd = make_sd(layout, G608, seed=22)
    path = save_full(tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-300.pth', sd)
    rt32, rt16 = RuntimeM2D(path), RuntimeM2D(path, bf16=True)
    assert rt16.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    long = torch.cat([wav, wav], dim=1).repeat(1, 4)  # 8 s: a full chunk and a remainder
    x32, x16 = rt32.encode(long), rt16.encode(long)
    assert x16.dtype == torch.float32 and x16.shape == x32.shape
    assert F.cosine_similarity(x16, x32, dim=-1).min() >= 0.99
    layers = rt16.encode(long, return_layers=True)
    assert len(layers) == DEPTH and all(layer.dtype == torch.float32 for layer in layers)


def test_args_with_numpy_and_paths_load_without_trust(tmp_path, layout):
    import numpy as np

    sd = encoder_part(make_sd(layout, G608, seed=23))
    path = tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-300.pth'
    path.parent.mkdir(parents=True)
    args = argparse.Namespace(norm_stats=[np.float64(-8.1), np.float32(4.3)], crop=np.int64(608),
                              mean=np.zeros(3), output_dir=Path('/tmp/out'))
    torch.save({'model': sd, 'epoch': 300, 'args': args}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.meta['args'].crop == 608 and ckpt.meta['args'].output_dir == Path('/tmp/out')


# ---------------------------------------------------------------------------------------------
# memory-mapped loading


def _training_file(path: Path, sd) -> Path:
    """A training checkpoint as `m2d pretrain` writes it: weights plus AdamW moments and run state."""
    online = {k: v for k, v in sd.items() if _part(k) in ('encoder', 'decoder')}
    state = {i: {'step': torch.tensor(5.0), 'exp_avg': 1e-3 * v, 'exp_avg_sq': 1e-6 * v.square()}
             for i, v in enumerate(online.values())}
    optimizer = {'state': state, 'param_groups': [{'lr': 1e-4, 'params': list(state)}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': sd, 'optimizer': optimizer, 'scaler': {}, 'epoch': 3, 'step': 30, 'iter_in_epoch': 0,
                'args': argparse.Namespace(model='m2d_vit_base')}, path)
    return path


def test_mmap_load_equals_reading_the_file_and_leaks_no_map(tmp_path, layout, wav):
    from m2d.checkpoint import save_checkpoint

    sd = make_sd(layout, G608)
    path = _training_file(tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-last.pth', sd)
    before = path.read_bytes()
    mapped = load_checkpoint(path)
    read = load_checkpoint(path, mmap=False)
    assert 'optimizer' not in mapped.meta and mapped.meta['epoch'] == 3
    assert sorted(mapped.encoder) == sorted(read.encoder)
    assert all(torch.equal(mapped.encoder[k], read.encoder[k]) for k in read.encoder)
    rt = RuntimeM2D(checkpoint=mapped)
    expected = RuntimeM2D(checkpoint=read).encode(wav)
    assert torch.equal(rt.encode(wav), expected)  # bit-identical to reading the whole file
    assert close(expected, ref_features(sd, normalized(rt, wav, (-8.1, 4.3)), G608))

    # the module holds copies: writing into the mapped tensors changes neither the module nor the file
    for v in mapped.encoder.values():
        v.add_(1.0)
    assert torch.equal(rt.encode(wav), expected)
    assert path.read_bytes() == before
    # writing into the module changes neither the file nor a fresh load
    with torch.no_grad():
        for p in rt.backbone.parameters():
            p.mul_(0.5)
    assert path.read_bytes() == before
    assert torch.equal(RuntimeM2D(path).encode(wav), expected)

    # a file replaced (atomically, by rename) while mapped: the map keeps the old contents
    kept = load_checkpoint(path)
    save_checkpoint({'model': make_sd(layout, G608, seed=5), 'epoch': 4}, path)
    assert torch.equal(RuntimeM2D(checkpoint=kept).encode(wav), expected)
    assert not torch.equal(RuntimeM2D(path).encode(wav), expected)


def test_legacy_non_zip_file_loads_without_mmap(tmp_path, layout, wav):
    sd = make_sd(layout, G608, parts=('encoder', 'norm_stats'))
    path = tmp_path / 'm2d_vit_base-80x608p16x16-221006-mr7' / 'checkpoint-300.pth'
    path.parent.mkdir(parents=True)
    torch.save({'model': sd, 'epoch': 300}, path, _use_new_zipfile_serialization=False)
    rt = RuntimeM2D(path)
    assert torch.equal(rt.encode(wav), RuntimeM2D(checkpoint=load_checkpoint(path, mmap=False)).encode(wav))
