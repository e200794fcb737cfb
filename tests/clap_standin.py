"""Self-contained stand-ins for M2D-CLAP tests: tiny text encoders and a tiny CLAP weight file.

Nothing here touches the network. Import from a test (``from clap_standin import ...``; pytest puts
``tests/`` on ``sys.path``) or copy the file.

- `write_text_encoder(folder, kind)`: a BERT-architecture model with seeded weights and a 40-word
  WordPiece vocabulary, saved as a hub folder (``config.json``, ``model.safetensors``, ``vocab.txt``,
  ``tokenizer_config.json``). ``kind='gte'`` stands in for
  ``thenlper/gte-base`` (sentence vector: mean of the last hidden states over the attention mask),
  ``kind='bert'`` for ``bert-base-uncased`` (sentence vector: the [CLS] hidden state).
- `reference_text_vectors(folder, texts, kind, text_proj)`: the reference's sentence vectors,
  computed one text at a time with token ids looked up here by hand (no tokenizer, no padding).
- `write_clap_standin(folder, ...)`: an M2D-CLAP weight file in the released layout
  (``{'model': sd, 'epoch', 'args'}`` with the encoder, ``audio_proj.0/.2``, ``logit_scale`` and,
  optionally, ``text_proj`` as one Linear or as Linear-ReLU-Linear, and the text encoder's weights
  under ``text_encoder.`` for ``TI`` files), in a folder named like a release.
- `reference_clap_audio(path, wav)`: the reference's CLAP audio embedding of that file, written
  independently of `m2d.RuntimeM2D`'s CLAP code (its front-end and ViT give the patch tokens);
  `semantic_projection` writes out the 2025 release's AudioToSemantic projector.
- `clap_parts(path)`, `apply_proj`, `cosine`: the file's projections and the notebook's cosine.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]',
         'a', 'the', 'of', 'and', 'can', 'be', 'heard', 'sound', 'dog', 'barking', 'rain', 'siren', 'car',
         'horn', 'bird', 'chirping', 'water', 'drops', 'engine', 'music', 'speech', 'man', 'woman', 'is',
         'speaking', 'loud', 'quiet', 'door', 'knock', 'baby', 'cry', '##ing', '##s', '.', ',']
TEXT_HIDDEN = 32  # width of the tiny text encoders
POOLING = {'gte': 'mean', 'bert': 'cls'}


def write_vocab(folder: str | Path) -> Path:
    """The WordPiece vocabulary file (one token a line, [PAD] = 0)."""
    path = Path(folder) / 'vocab.txt'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(VOCAB) + '\n')
    return path


def write_text_encoder(folder: str | Path, kind: str = 'gte', hidden: int = TEXT_HIDDEN, layers: int = 2,
                       seed: int = 0) -> Path:
    """A tiny BertModel + BertTokenizer saved to `folder` (loadable with AutoModel/AutoTokenizer offline)."""
    from transformers import BertConfig, BertModel

    if kind not in POOLING:
        raise ValueError(f'kind must be one of {sorted(POOLING)}, got {kind!r}')
    folder = Path(folder)
    vocab = write_vocab(folder)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, type_vocab_size=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    with torch.no_grad():  # non-trivial values everywhere, LayerNorms included
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    # The tokenizer as a hub folder of bert-base-uncased holds it: vocab.txt + tokenizer_config.json
    # (AutoTokenizer builds the WordPiece tokenizer from them, in transformers 4.x and 5.x alike).
    (folder / 'tokenizer_config.json').write_text(json.dumps(
        {'tokenizer_class': 'BertTokenizer', 'do_lower_case': True, 'model_max_length': 512}))
    return folder


def token_ids(text: str) -> list[int]:
    """[CLS] + the words of `text` (lower case, '.'/',' split off, all in VOCAB) + [SEP], by hand."""
    words = text.lower().replace('.', ' . ').replace(',', ' , ').split()
    return [VOCAB.index('[CLS]')] + [VOCAB.index(w) for w in words] + [VOCAB.index('[SEP]')]


@torch.no_grad()
def reference_text_vectors(folder: str | Path, texts: list[str], kind: str,
                           text_proj: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Sentence vectors as the reference computes them, one text at a time (so no padding is involved):
    GTE = mean over all tokens of the last hidden state, BERT = the [CLS] hidden state; then
    ``text_proj`` (a state dict ``weight/bias`` or ``0.weight, 0.bias, 2.weight, 2.bias``) when given."""
    from transformers import BertModel

    model = BertModel.from_pretrained(str(folder)).eval()
    rows = []
    for text in texts:
        ids = torch.tensor([token_ids(text)])
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        rows.append(hidden.mean(0) if POOLING[kind] == 'mean' else hidden[0])
    x = torch.stack(rows)
    if text_proj:
        x = apply_proj(x, text_proj)
    return x


def apply_proj(x: torch.Tensor, proj: dict[str, torch.Tensor]) -> torch.Tensor:
    """A projection given as a state dict: one Linear (``weight``) or Linear-ReLU-Linear (``0.*``, ``2.*``)."""
    if 'weight' in proj:
        return F.linear(x, proj['weight'], proj['bias'])
    return F.linear(F.relu(F.linear(x, proj['0.weight'], proj['0.bias'])), proj['2.weight'], proj['2.bias'])


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def write_clap_standin(folder: str | Path, name: str = 'm2d_clap_vit_tiny-80x208p16x16-240128',
                       text_proj: str | None = None, text_dim: int = TEXT_HIDDEN, embed_dim: int = 64,
                       depth: int = 2, text_encoder: str | Path | None = None, text_encoder_kind: str = 'gte',
                       logit_scale: float | None = math.log(1 / 0.07), audio_proj: str = 'mlp',
                       sem_depth: int = 1, sem_mlp_ratio: int = 1, layout: str = 'release', seed: int = 0) -> Path:
    """An M2D-CLAP weight file in the released layout; returns ``folder/name/checkpoint-300.pth``.

    `audio_proj`: ``'mlp'`` (``audio_proj.0/.2``, the 2024 release) or ``'semantic'`` (the 2025
    release's AudioToSemantic: ``audio_proj.sem_token``, ``sem_blocks.N.*`` timm blocks with one head,
    ``norm``). `layout`: ``'release'`` (``{'model': sd}`` with bare encoder keys, as the 2024 file) or
    ``'runtime'`` (a reference RuntimeM2D state dict, as the 2025 file: ``backbone.*`` keys, the text
    encoder beside them, mel-filter buffers ``to_spec.*``). `logit_scale` None: no ``logit_scale``
    (the 2025 file has none).

    `text_proj`: None (no ``text_proj`` keys: the text encoder's width must equal `embed_dim`, as in
    the 2024 release), ``'linear'`` (``text_proj.weight``: `text_dim` -> `embed_dim`) or ``'mlp'``
    (``text_proj.0/.2``: `text_dim` -> `text_dim` -> `embed_dim`). `text_encoder`: a folder written by
    `write_text_encoder` whose weights are stored inside the file under ``text_encoder.`` with the
    reference's module names (``model.`` for GTE, ``text_encoder.`` for BERT), as its ``TI`` files do;
    name such a file ``...p16kpApTI-...`` / ``...p16kpBpTI-...``.
    """
    from m2d.checkpoint import parse_model_name
    from m2d.vit import ViTConfig, ViTEncoder

    geo = parse_model_name(name)
    if geo is None:
        raise ValueError(f'{name!r} is not a model name (MODEL-FxTpPHxPW...)')
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = ViTEncoder(ViTConfig(input_size=geo.input_size, patch_size=geo.patch_size, embed_dim=embed_dim,
                               depth=depth, num_heads=max(1, embed_dim // 64)))
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    sd = dict(enc.state_dict())
    sd['norm_stats'] = torch.tensor([-8.0, 4.0])
    D = embed_dim

    def lin(prefix, n_in, n_out):
        sd[f'{prefix}.weight'] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
        sd[f'{prefix}.bias'] = 0.1 * torch.randn(n_out, generator=g)

    if audio_proj == 'mlp':
        lin('audio_proj.0', D, D)
        lin('audio_proj.2', D, D)
    elif audio_proj == 'semantic':
        sd['audio_proj.sem_token'] = 0.5 * torch.randn(1, 1, D, generator=g)
        for i in range(sem_depth):
            b = f'audio_proj.sem_blocks.{i}'
            for norm in ('norm1', 'norm2'):
                sd[f'{b}.{norm}.weight'] = 1 + 0.1 * torch.randn(D, generator=g)
                sd[f'{b}.{norm}.bias'] = 0.1 * torch.randn(D, generator=g)
            lin(f'{b}.attn.qkv', D, 3 * D)
            lin(f'{b}.attn.proj', D, D)
            lin(f'{b}.mlp.fc1', D, sem_mlp_ratio * D)
            lin(f'{b}.mlp.fc2', sem_mlp_ratio * D, D)
        sd['audio_proj.norm.weight'] = 1 + 0.1 * torch.randn(D, generator=g)
        sd['audio_proj.norm.bias'] = 0.1 * torch.randn(D, generator=g)
    else:
        raise ValueError(f"audio_proj must be 'mlp' or 'semantic', got {audio_proj!r}")
    if text_proj == 'linear':
        lin('text_proj', text_dim, D)
    elif text_proj == 'mlp':
        lin('text_proj.0', text_dim, text_dim)
        lin('text_proj.2', text_dim, D)
    elif text_proj is not None:
        raise ValueError(f"text_proj must be None, 'linear' or 'mlp', got {text_proj!r}")
    if logit_scale is not None:
        sd['logit_scale'] = torch.tensor(float(logit_scale))
    if layout == 'runtime':
        sd = {'backbone.' + k: v for k, v in sd.items()}
        sd['to_spec.mel_basis'] = torch.zeros(80, 201)  # the reference runtime's front-end buffers
    elif layout == 'release':
        sd['mask_token'] = torch.zeros(1, 1, 32)  # a training-only tensor, dropped on load as in the releases
    else:
        raise ValueError(f"layout must be 'release' or 'runtime', got {layout!r}")
    if text_encoder is not None:
        from safetensors.torch import load_file

        module = 'model.' if text_encoder_kind == 'gte' else 'text_encoder.'
        weights = load_file(str(Path(text_encoder) / 'model.safetensors'))
        sd.update({f'text_encoder.{module}{k}': v for k, v in weights.items()})
    path = Path(folder) / name / 'checkpoint-300.pth'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': sd, 'epoch': 300, 'args': argparse.Namespace(model=geo.model)}, path)
    return path


def clap_parts(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``audio_proj`` and ``text_proj`` state dicts (empty when absent) and ``logit_scale`` (None when
    absent) of a stand-in, in either layout."""
    sd = torch.load(path, map_location='cpu', weights_only=False)['model']
    if 'backbone.patch_embed.proj.weight' in sd:
        sd = _sub(sd, 'backbone.')
    return {'audio_proj': _sub(sd, 'audio_proj.'), 'text_proj': _sub(sd, 'text_proj.'),
            'logit_scale': sd.get('logit_scale')}


def semantic_projection(tokens: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference's AudioToSemantic written out: [sem_token; tokens] through pre-norm blocks with one
    attention head (LayerNorm eps 1e-5, exact GELU), then the LayerNorm of the sem_token's output."""
    B, _, D = tokens.shape
    x = torch.cat([sd['sem_token'].expand(B, -1, -1), tokens], dim=1)
    i = 0
    while f'sem_blocks.{i}.norm1.weight' in sd:
        p = {k[len(f'sem_blocks.{i}.'):]: v for k, v in sd.items() if k.startswith(f'sem_blocks.{i}.')}
        h = F.layer_norm(x, (D,), p['norm1.weight'], p['norm1.bias'], 1e-5)
        q, k, v = F.linear(h, p['attn.qkv.weight'], p['attn.qkv.bias']).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
        x = x + F.linear(attn @ v, p['attn.proj.weight'], p['attn.proj.bias'])
        h = F.layer_norm(x, (D,), p['norm2.weight'], p['norm2.bias'], 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, p['mlp.fc1.weight'], p['mlp.fc1.bias'])), p['mlp.fc2.weight'],
                         p['mlp.fc2.bias'])
        i += 1
    return F.layer_norm(x[:, 0], (D,), sd['norm.weight'], sd['norm.bias'], 1e-5)


@torch.no_grad()
def reference_clap_audio(path: str | Path, wav: torch.Tensor) -> torch.Tensor:
    """The reference's ``encode_clap_audio`` with flat features on a clip within one model window:
    log-mel (m2d's front-end) -> normalize -> ViT tokens without [CLS] -> mean -> audio_proj (or, for
    a semantic projector, all tokens -> `semantic_projection`)."""
    from m2d.runtime import RuntimeM2D

    rt = RuntimeM2D(path, flat_features=True)
    lms = rt.normalize_batch(rt.to_feature(wav))
    pw = rt.cfg.patch_size[1]
    lms = F.pad(lms, (0, (pw - lms.shape[-1] % pw) % pw))
    if lms.shape[-1] > rt.cfg.input_size[1]:
        raise ValueError('reference_clap_audio covers clips within one model window')
    tokens = rt.backbone(lms)[:, 1:].float()
    proj = clap_parts(path)['audio_proj']
    if 'sem_token' in proj:
        return semantic_projection(tokens, proj)
    return apply_proj(tokens.mean(1), proj)


def cosine(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[A, T]`` as the reference's notebook: L2-normalize both, then a matmul."""
    a = a / a.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    return a @ t.T
