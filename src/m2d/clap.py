"""M2D-CLAP's text side: the sentence encoder each CLAP weight file was trained with.

A CLAP file's name says which text encoder it pairs with (the reference's ``parse_clap_type``): the
letters after the sample rate in ``m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025`` are ``B`` (the
type) and ``TI`` (the text encoder's weights are inside the weight file); a name without them is
type ``A`` (the 2024 release). Sentence vectors are computed as the reference computes them:

- ``A``: GTE base (``thenlper/gte-base``): the mean of the last hidden states over the attention mask.
- ``B``: BERT base (``google-bert/bert-base-uncased``): the last hidden state of [CLS].
- ``N``: NV-Embed-v2 (``nvidia/NV-Embed-v2``) through sentence-transformers (optional; see `NVEmbedEncoder`).

Tokenizer settings as the reference: padding to the longest text, ``max_length=512``, no truncation
unless asked (``truncate=True``). Weights come from the Hugging Face cache as ``transformers`` finds
them (set ``HF_HUB_OFFLINE=1`` to stay offline once cached), or from a local folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .errors import M2DError

log = logging.getLogger(__name__)

TEXT_ENCODERS = {  # type letter -> (hub model, pooling, description)
    'A': ('thenlper/gte-base', 'mean', 'GTE base'),
    'B': ('google-bert/bert-base-uncased', 'cls', 'BERT base'),
    'N': ('nvidia/NV-Embed-v2', 'sentence-transformers', 'NV-Embed-v2'),
}
MAX_LENGTH = 512  # tokens, as the reference's encoders
TEXT_BATCH = 64  # texts encoded together by `encode_texts` (results do not depend on it)
DEFAULT_TEMPLATE = '{label} can be heard'  # the reference's zero-shot ESC-50 notebook
CLIP_INITIAL_LOGIT_SCALE = 1 / 0.07  # the reference's initial (and CLIP's) temperature, for files without one


class ClapError(M2DError, ValueError):
    """A CLAP text-side setting or file that cannot be used; the message names it."""


def require_transformers():
    """The ``transformers`` module, or a one-line ClapError naming the ``m2d[clap]`` extra."""
    try:
        import transformers
    except ImportError:
        raise ClapError("the M2D-CLAP text encoders need the `transformers` package: pip install 'm2d[clap]'") from None
    return transformers


def parse_clap_type(extra: Sequence[str], source: str = '') -> str:
    """The text encoder type (``'A'``, ``'B'`` or ``'N'``) from the letters after a model name's sample
    rate (`m2d.checkpoint.ModelName.extra`); ``'A'`` when there are none, as the reference."""
    if not extra:
        return 'A'
    if extra[0] not in TEXT_ENCODERS:
        known = ', '.join(f'{k} ({v[2]})' for k, v in TEXT_ENCODERS.items())
        raise ClapError(f'{source or "the weight file"}: text encoder type {extra[0]!r} in the name is not one of '
                        f'{known}; pass text_encoder= (CLI: --text_encoder) with one of these letters')
    return extra[0]


def text_encoder_included(extra: Sequence[str], source: str = '') -> bool:
    """Whether the name says the text encoder's weights are in the file (``...pTI``); the reference's
    ``parse_clap_text_encoder_weight`` accepts nothing else after the type."""
    if len(extra) <= 1:
        return False
    if extra[1] == 'TI':
        return True
    raise ClapError(f'{source or "the weight file"}: unknown letters {"p".join(extra[1:])!r} after the text '
                    'encoder type in the name (the reference knows only TI: text encoder included)')


def captions(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Zero-shot captions: each label with ``_`` made a space, put in `template` (``{label}``)."""
    if '{label}' not in template:
        raise ClapError(f'--template {template!r}: must contain {{label}}')
    return [template.replace('{label}', ' '.join(str(label).split('_'))) for label in labels]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` cosines of the rows of `a` ``[A, D]`` and `b` ``[B, D]``: both L2-normalized, then a
    matrix product (the reference's notebook; its training loss scales the same by ``logit_scale.exp()``)."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T


def _is_local(name_or_dir: str | Path) -> bool:
    return Path(name_or_dir).expanduser().is_dir()


def _hub_load(loader, name_or_dir: str | Path, what: str):
    """``loader.from_pretrained`` with an error that names the model and how to get it."""
    src = str(Path(name_or_dir).expanduser()) if _is_local(name_or_dir) else str(name_or_dir)
    try:
        return loader(src)
    except OSError as e:
        raise ClapError(f'{src}: cannot load the {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); '
                        'give a local folder with --text_encoder, or download it once with network access '
                        '(it is then read from the Hugging Face cache; HF_HUB_OFFLINE=1 keeps it offline)') from None


class HFTextEncoder(nn.Module):
    """A ``transformers`` sentence encoder: GTE-style mean pooling or BERT-style [CLS].

    Args:
        name_or_dir: a hub model name or a local folder (``config.json``, weights, tokenizer files).
        pooling: ``'mean'`` (over the attention mask) or ``'cls'``.
        state_dict: weights to use instead of the folder's (a ``TI`` file's text encoder): the model is
            then built from the folder's config only and these weights are loaded strictly.
    """

    def __init__(self, name_or_dir: str | Path, pooling: str, state_dict: dict[str, torch.Tensor] | None = None,
                 source: str = ''):
        super().__init__()
        if pooling not in ('mean', 'cls'):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        transformers = require_transformers()
        os.environ.setdefault('TOKENIZERS_PARALLELISM', 'true')  # as the reference, to quiet a warning
        self.name, self.pooling = str(name_or_dir), pooling
        self.tokenizer = _hub_load(transformers.AutoTokenizer.from_pretrained, name_or_dir, 'tokenizer')
        if state_dict is None:
            self.model = _hub_load(transformers.AutoModel.from_pretrained, name_or_dir, 'text encoder')
        else:
            config = _hub_load(transformers.AutoConfig.from_pretrained, name_or_dir, 'text encoder config')
            self.model = transformers.AutoModel.from_config(config)
            self._load(state_dict, source)
        self.model.eval()

    def _load(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        # Buffers that some transformers versions save and others do not; the pooler is never used here.
        ignorable = ('embeddings.position_ids', 'embeddings.token_type_ids', 'pooler.')
        missing = [k for k in missing if not k.startswith(ignorable)]
        unexpected = [k for k in unexpected if not k.startswith(ignorable)]
        if missing or unexpected:
            raise ClapError(f'{source}: the text encoder weights in the file do not fit {self.name} '
                            f'(missing {missing[:3]}, unexpected {unexpected[:3]})')

    def forward(self, texts: Sequence[str], truncate: bool = False) -> torch.Tensor:
        """Sentence vectors ``[N, hidden]`` of `texts`."""
        device = next(self.model.parameters()).device
        # max_length only matters with truncation (transformers warns when it is given without).
        limit = {'max_length': MAX_LENGTH, 'truncation': True} if truncate else {'truncation': False}
        batch = self.tokenizer(list(texts), padding=True, return_tensors='pt', **limit)
        mask = batch['attention_mask'].to(device)
        if batch['input_ids'].shape[1] > MAX_LENGTH:
            raise ClapError(f'a text of {batch["input_ids"].shape[1]} tokens is longer than the text encoder '
                            f'takes ({MAX_LENGTH}); shorten it or pass truncate=True')
        inputs = {'input_ids': batch['input_ids'].to(device), 'attention_mask': mask}
        if self.pooling == 'mean' and 'token_type_ids' in batch:  # GTE: as the reference, all three inputs
            inputs['token_type_ids'] = batch['token_type_ids'].to(device)
        hidden = self.model(**inputs).last_hidden_state
        if self.pooling == 'cls':
            return hidden[:, 0]
        hidden = hidden.masked_fill(~mask[..., None].bool(), 0.0)
        return hidden.sum(1) / mask.sum(1)[..., None]


class NVEmbedEncoder(nn.Module):
    """NV-Embed-v2 through sentence-transformers, as the reference: texts with the tokenizer's EOS
    appended, right padding, ``max_seq_length`` 32768, all texts in one batch.

    Needs ``pip install sentence-transformers`` and what the model's own code needs (its model card:
    ``trust_remote_code``, a GPU with room for a 7B model); not tested here.
    """

    def __init__(self, name_or_dir: str | Path = TEXT_ENCODERS['N'][0], state_dict=None, source: str = ''):
        super().__init__()
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ClapError('NV-Embed-v2 (weight files named ...pN) needs sentence-transformers: '
                            'pip install sentence-transformers') from None
        os.environ.setdefault('TOKENIZERS_PARALLELISM', 'true')
        self.name = str(name_or_dir)
        self.model = SentenceTransformer(self.name, trust_remote_code=True)
        self.model.max_seq_length = 32768
        self.model.tokenizer.padding_side = 'right'
        if state_dict is not None:
            self.model.load_state_dict(state_dict)

    def forward(self, texts: Sequence[str], truncate: bool = False) -> torch.Tensor:
        eos = self.model.tokenizer.eos_token
        return self.model.encode([t + eos for t in texts], batch_size=len(texts), show_progress_bar=False,
                                 convert_to_tensor=True)


def resolve_text_encoder(clap_type: str, override: str | Path | None) -> tuple[str, str | Path]:
    """``(type, name_or_dir)``: `override` may be a type letter (its default model), a hub name or a folder."""
    if override is None:
        return clap_type, TEXT_ENCODERS[clap_type][0]
    if str(override) in TEXT_ENCODERS:
        return str(override), TEXT_ENCODERS[str(override)][0]
    return clap_type, override


def load_text_encoder(clap_type: str, name_or_dir: str | Path | None = None,
                      state_dict: dict[str, torch.Tensor] | None = None, source: str = '') -> nn.Module:
    """The text encoder of `clap_type`, from `name_or_dir` (default: the reference's hub model), with
    the weights of `state_dict` when given (a ``TI`` file; keys as in the reference's wrappers,
    ``model.*`` for GTE and ``text_encoder.*`` for BERT, or bare)."""
    if clap_type not in TEXT_ENCODERS:
        raise ClapError(f'text encoder type {clap_type!r}: must be one of {", ".join(TEXT_ENCODERS)}')
    hub, pooling, desc = TEXT_ENCODERS[clap_type]
    name_or_dir = name_or_dir or hub
    if state_dict is not None:
        for prefix in ('model.', 'text_encoder.'):  # the reference's attribute names for the HF model
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                break
    log.info('CLAP text encoder: %s (%s)%s', desc, name_or_dir, ' with the weights in the file' if state_dict else '')
    if pooling == 'sentence-transformers':
        return NVEmbedEncoder(name_or_dir, state_dict, source)
    return HFTextEncoder(name_or_dir, pooling, state_dict, source)


def encode_texts(encoder: nn.Module, texts: Sequence[str], truncate: bool = False,
                 batch_size: int = TEXT_BATCH) -> torch.Tensor:
    """Sentence vectors ``[N, hidden]`` float32 of `texts`, `batch_size` texts per pass (the mask-aware
    pooling makes each vector independent of the others in its batch)."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ClapError('no texts to encode')
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ClapError(f'texts must be strings, got {type(bad[0]).__name__}')
    from tqdm.auto import tqdm

    bs = max(1, int(batch_size))
    starts = range(0, len(texts), bs)
    parts = [encoder(texts[i:i + bs], truncate=truncate).float()
             for i in tqdm(starts, desc='texts', unit='batch', disable=len(starts) < 4, leave=False)]
    return torch.cat(parts)
