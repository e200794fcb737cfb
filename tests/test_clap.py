"""M2D-CLAP's text side (m2d.clap, RuntimeM2D.encode_text) on tiny text encoders built here (no network)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

pytest.importorskip('transformers', reason="the M2D-CLAP text side needs transformers (pip install 'm2d[clap]')")

import m2d
from clap_standin import (clap_parts, cosine, reference_clap_audio, reference_text_vectors,
                          write_clap_standin, write_text_encoder)
from m2d.checkpoint import export_encoder, load_checkpoint, parse_model_name
from m2d.clap import ClapError, captions, parse_clap_type, text_encoder_included

TEXTS = ['dog', 'a dog barking can be heard', 'rain .', 'the sound of a siren and a car horn', 'music']


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """A test never reaches the hub, and sees an empty Hugging Face cache."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    hub = pytest.importorskip('huggingface_hub.constants')
    monkeypatch.setattr(hub, 'HF_HUB_OFFLINE', True)  # read once at import
    monkeypatch.setattr(hub, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))
    with torch.no_grad():
        yield


@pytest.fixture(scope='module')
def encoders(tmp_path_factory):
    """Tiny text encoders: GTE- and BERT-shaped, 32 wide (for text_proj) and 64 wide (no text_proj)."""
    root = tmp_path_factory.mktemp('text')
    return {(kind, hidden): write_text_encoder(root / f'{kind}{hidden}', kind, hidden=hidden, seed=3 + hidden)
            for kind in ('gte', 'bert') for hidden in (32, 64)}


def _standin(tmp_path, kind, text_proj, **kw):
    letter = {'gte': 'A', 'bert': 'B'}[kind]
    name = f'm2d_clap_vit_tiny-80x208p16x16p16kp{letter}-240128'
    return write_clap_standin(tmp_path, name=name, text_proj=text_proj,
                              text_dim=32 if text_proj else 64, **kw)


@pytest.mark.parametrize('kind', ['gte', 'bert'])
@pytest.mark.parametrize('text_proj', [None, 'linear', 'mlp'])
def test_text_vectors_equal_the_reference_path(tmp_path, encoders, kind, text_proj):
    folder = encoders[(kind, 32 if text_proj else 64)]
    path = _standin(tmp_path, kind, text_proj)
    rt = m2d.load(path, text_encoder=folder)
    got = rt.encode_text(TEXTS)
    proj = clap_parts(path)['text_proj']
    assert bool(proj) == (text_proj is not None)
    want = reference_text_vectors(folder, TEXTS, kind, proj)
    assert got.shape == (len(TEXTS), 64) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the other pooling gives other vectors: the check above can tell them apart
    other = reference_text_vectors(folder, TEXTS, 'bert' if kind == 'gte' else 'gte', proj)
    assert (got - other).abs().max() > 1e-2
    # one text at a time, and a batch of other sizes, give the same vectors (mask-aware pooling)
    single = torch.cat([rt.encode_text([t]) for t in TEXTS])
    assert torch.allclose(got, single, atol=1e-5)
    assert torch.allclose(got, rt.encode_text(TEXTS, batch_size=2), atol=1e-5)
    assert torch.allclose(rt.encode_text(TEXTS[1]), got[1:2], atol=1e-5)     # a str is one text
    assert torch.allclose(rt.encode_clap_text(TEXTS), got)                    # the reference's name


def test_type_comes_from_the_name(tmp_path, encoders):
    assert parse_clap_type(()) == 'A' and parse_clap_type(('B', 'TI')) == 'B' and parse_clap_type(('N',)) == 'N'
    assert parse_model_name('m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025').extra == ('B', 'TI')
    assert parse_model_name('m2d_clap_vit_base-80x608p16x16-240128').extra == ()
    assert text_encoder_included(('B', 'TI')) and not text_encoder_included(('A',))
    with pytest.raises(ClapError, match="type 'Z'"):
        parse_clap_type(('Z',), 'x.pth')
    with pytest.raises(ClapError, match='only TI'):
        text_encoder_included(('A', 'XX'), 'x.pth')
    # a 'B' file uses [CLS] on whatever folder it is given
    folder = encoders[('gte', 32)]
    path = _standin(tmp_path, 'bert', 'linear')
    proj = clap_parts(path)['text_proj']
    assert torch.allclose(m2d.load(path, text_encoder=folder).encode_text(TEXTS),
                          reference_text_vectors(folder, TEXTS, 'bert', proj), atol=1e-5)
    # a name without letters is type A (GTE): the default hub model, which is not in this empty cache
    plain = write_clap_standin(tmp_path, text_proj='linear')
    with pytest.raises(ClapError, match='thenlper/gte-base: cannot load the tokenizer'):
        m2d.load(plain).encode_text(['dog'])


@pytest.mark.parametrize('letter, hub, kind', [('', 'thenlper/gte-base', 'gte'),
                                               ('pB', 'google-bert/bert-base-uncased', 'bert')])
def test_default_text_encoder_from_the_hugging_face_cache(tmp_path, letter, hub, kind):
    """No --text_encoder: the reference's hub model, found offline in the Hugging Face cache layout
    (models--ORG--NAME/snapshots/REV, refs/main), as transformers reads it."""
    repo = tmp_path / 'hf-cache' / ('models--' + hub.replace('/', '--'))
    snapshot = write_text_encoder(repo / 'snapshots' / ('0' * 40), kind, hidden=64, seed=7)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    path = write_clap_standin(tmp_path, name=f'm2d_clap_vit_tiny-80x208p16x16p16k{letter}-240128')
    rt = m2d.load(path)
    assert torch.allclose(rt.encode_text(TEXTS), reference_text_vectors(snapshot, TEXTS, kind), atol=1e-5)
    assert rt.text_encoder.name == hub
    # a type letter as the override picks that type's model and pooling
    other, other_hub = ('B', 'google-bert/bert-base-uncased') if kind == 'gte' else ('A', 'thenlper/gte-base')
    with pytest.raises(ClapError, match=f'{other_hub}: cannot load'):
        m2d.load(path, text_encoder=other).encode_text(TEXTS)   # not in this cache


def test_text_encoder_inside_the_file(tmp_path, encoders):
    """A ...pBpTI file carries its trained text encoder: its weights win over the folder's."""
    trained = write_text_encoder(tmp_path / 'trained', 'bert', hidden=32, seed=11)
    path = write_clap_standin(tmp_path, name='m2d_clap_vit_tiny-80x208p16x16p16kpBpTI-2025', text_proj='mlp',
                              text_encoder=trained, text_encoder_kind='bert')
    assert load_checkpoint(path).text_encoder  # kept, not dropped
    rt = m2d.load(path, text_encoder=encoders[('bert', 32)])   # config + tokenizer from here, weights from the file
    proj = clap_parts(path)['text_proj']
    got = rt.encode_text(TEXTS)
    assert torch.allclose(got, reference_text_vectors(trained, TEXTS, 'bert', proj), atol=1e-5)
    assert (got - reference_text_vectors(encoders[('bert', 32)], TEXTS, 'bert', proj)).abs().max() > 1e-2
    # exported to safetensors: the name's letters and the text encoder travel with it
    st = export_encoder(path, tmp_path / 'clap.safetensors')
    assert torch.allclose(m2d.load(st, text_encoder=encoders[('bert', 32)]).encode_text(TEXTS), got, atol=1e-6)
    # the name says TI but the file holds no text encoder
    bare = write_clap_standin(tmp_path, name='m2d_clap_vit_tiny-80x208p16x16p16kpApTI-2025', text_proj='linear')
    with pytest.raises(ClapError, match='no text_encoder'):
        m2d.load(bare, text_encoder=encoders[('gte', 32)]).encode_text(['dog'])


@pytest.mark.parametrize('sem', [(1, 1), (2, 2)])
def test_2025_layout_with_semantic_audio_projector(tmp_path, sem):
    """As m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025: a reference RuntimeM2D state dict (backbone.*),
    the AudioToSemantic audio projector, BERT inside the file, no text_proj and no logit_scale."""
    trained = write_text_encoder(tmp_path / 'trained', 'bert', hidden=64, seed=21)
    path = write_clap_standin(tmp_path, name='m2d_clap_vit_tiny-80x208p16x16p16kpBpTI-2025', layout='runtime',
                              audio_proj='semantic', sem_depth=sem[0], sem_mlp_ratio=sem[1], logit_scale=None,
                              text_encoder=trained, text_encoder_kind='bert')
    ckpt = load_checkpoint(path)
    assert ckpt.dropped == ['to_spec.mel_basis'] and ckpt.norm_stats == (-8.0, 4.0) and ckpt.name_extra == ('B', 'TI')
    rt = m2d.load(path, text_encoder=trained)
    assert len(rt.audio_proj.sem_blocks) == sem[0] and rt.text_proj is None
    wav = 0.1 * torch.randn(2, 24000, generator=torch.Generator().manual_seed(4))
    a = rt.encode_audio(wav)
    want = reference_clap_audio(path, wav)
    assert a.shape == (2, 64) and torch.allclose(a, want, atol=1e-5), (a - want).abs().max()
    t = rt.encode_text(TEXTS)
    assert torch.allclose(t, reference_text_vectors(trained, TEXTS, 'bert'), atol=1e-5)
    assert rt.clap_scale == pytest.approx(1 / 0.07)   # no logit_scale: the reference's initial value
    assert torch.allclose(rt.zero_shot_probabilities(rt.similarity(a, t)),
                          torch.softmax(cosine(want, t) / 0.07, -1), atol=1e-5)


@pytest.mark.parametrize('text_proj', [None, 'linear'])
def test_zero_shot_similarity_and_probabilities(tmp_path, encoders, text_proj):
    folder = encoders[('gte', 32 if text_proj else 64)]
    path = _standin(tmp_path, 'gte', text_proj, logit_scale=math.log(30.0))
    rt = m2d.load(path, text_encoder=folder)
    wav = 0.1 * torch.randn(3, 16000, generator=torch.Generator().manual_seed(0))
    a = rt.encode_audio(wav)
    assert torch.allclose(a, reference_clap_audio(path, wav), atol=1e-5)
    labels = ['dog barking', 'rain', 'siren', 'car horn']
    t = rt.encode_text(captions(labels))
    want_t = reference_text_vectors(folder, [f'{x} can be heard' for x in labels], 'gte', clap_parts(path)['text_proj'])
    assert torch.allclose(t, want_t, atol=1e-5)
    sim = rt.similarity(a, t)
    assert sim.shape == (3, 4) and torch.allclose(sim, cosine(a, want_t), atol=1e-5)
    assert sim.abs().max() <= 1 + 1e-6 and sim.std() > 1e-3
    assert rt.clap_scale == pytest.approx(30.0)
    p = rt.zero_shot_probabilities(sim)
    assert torch.allclose(p, torch.softmax(30.0 * cosine(a, want_t), -1), atol=1e-5)
    assert torch.allclose(p.sum(-1), torch.ones(3)) and torch.equal(p.argsort(-1), sim.argsort(-1))


def test_captions_as_the_reference_notebook():
    assert captions(['dog', 'chirping_birds', 'door_wood_knock']) == \
        ['dog can be heard', 'chirping birds can be heard', 'door wood knock can be heard']
    assert captions(['Speech'], 'the sound of {label}.') == ['the sound of Speech.']
    with pytest.raises(ClapError, match='--template'):
        captions(['dog'], 'no placeholder')


def test_clear_errors(tmp_path, encoders, monkeypatch, small_ckpt):
    path = _standin(tmp_path, 'gte', 'linear')
    with monkeypatch.context() as m:
        m.setitem(sys.modules, 'transformers', None)
        with pytest.raises(ClapError, match=r"pip install 'm2d\[clap\]'"):
            m2d.load(path, text_encoder=encoders[('gte', 32)]).encode_text(['dog'])
    with pytest.raises(ValueError, match='not an M2D-CLAP weight file'):
        m2d.load(small_ckpt).encode_text(['dog'])
    rt = m2d.load(path, text_encoder=encoders[('gte', 32)])
    with pytest.raises(ClapError, match='no texts'):
        rt.encode_text([])
    with pytest.raises(ClapError, match='602 tokens is longer than the text encoder takes'):
        rt.encode_text(['dog', ' '.join(['dog'] * 600)])  # refused, as the reference (truncation=False)
    monkeypatch.setitem(sys.modules, 'sentence_transformers', None)
    with pytest.raises(ClapError, match=r'NV-Embed-v2 \(weight files named ...pN\) needs sentence-transformers'):
        m2d.load(path, text_encoder='N').encode_text(['dog'])
