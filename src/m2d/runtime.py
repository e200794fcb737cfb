"""RuntimeM2D: audio in, M2D features out, with the names users of the reference know."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .audio import LogMelSpectrogram, preset
from .checkpoint import Checkpoint, load_checkpoint
from .clap_proj import AudioToSemantic, semantic_audio_proj
from .errors import M2DError
from .labels import head_labels
from .streaming import STREAM_WINDOWS, encode_stream, feature_frames, waveform_blocks
from .vit import ViTEncoder, pack_weights

log = logging.getLogger(__name__)

MAX_CHUNKS_PER_PASS = 64  # full-length chunks encoded together in one forward pass


def _linear_stack(state: dict[str, torch.Tensor], prefix: str) -> nn.Module | None:
    """Rebuild a projection saved as one Linear (``p.weight``) or a Sequential of Linears + ReLU (``p.0.weight``)."""
    if f'{prefix}.weight' in state:
        w = state[f'{prefix}.weight']
        lin = nn.Linear(w.shape[1], w.shape[0], bias=f'{prefix}.bias' in state)
        lin.load_state_dict({k.split('.')[-1]: v for k, v in state.items() if k.startswith(prefix + '.')})
        return lin
    idx = sorted({int(k.split('.')[1]) for k in state if k.startswith(prefix + '.') and k.endswith('.weight')})
    if not idx:
        return None
    layers: list[nn.Module] = []
    for n, i in enumerate(idx):
        w = state[f'{prefix}.{i}.weight']
        while len(layers) < i:
            layers.append(nn.ReLU())
        lin = nn.Linear(w.shape[1], w.shape[0], bias=f'{prefix}.{i}.bias' in state)
        lin.load_state_dict({k.split('.')[-1]: v for k, v in state.items() if k.startswith(f'{prefix}.{i}.')})
        layers.append(lin)
    return nn.Sequential(*layers)


class DeviceError(M2DError, ValueError):
    """A ``--device`` value that names no usable torch device."""


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """A torch device from ``--device`` (default: cuda when available, else cpu); DeviceError when unusable."""
    try:
        device = torch.device(spec or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError:
        raise DeviceError(f'--device {spec!r}: not a torch device (e.g. cpu, cuda, cuda:1)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise DeviceError(f'--device {spec}: CUDA is not available on this machine')
    return device


class RuntimeM2D(nn.Module):
    """An M2D encoder with its front-end, loaded from any released weight file.

    Args:
        weight_file: a ``.pth`` (full, encoder-only, EVAR fine-tuned) or ``.safetensors`` file.
        flat_features: return one vector per patch ``[B, Fp*T', D]`` instead of stacking the
            frequency patches of each time step ``[B, T', Fp*D]``.
        num_classes: build the EVAR classification head (weights taken from a fine-tuned file).
        bf16: encode in bfloat16 (CPUs with avx512_bf16/AMX, GPUs): the encoder weights are cast
            once to bfloat16 and activations run in bfloat16 (the kernels accumulate LayerNorm,
            softmax and matmuls in float32); features come back as float32. On CPU the qkv and
            MLP fc1 layers run on oneDNN-packed weights with GELU fused into fc1 while no gradient
            is taken (`vit.pack_weights`), and the patch embedding is one matmul. An inference
            mode: for training in mixed precision, keep float32 weights and use ``torch.autocast``.
        trust: allow pickles that need more than tensors (runs code from the file).
        text_encoder: M2D-CLAP files: the text encoder to use instead of the one the file's name says
            (`m2d.clap`): a type letter (``'A'`` GTE base, ``'B'`` BERT base, ``'N'`` NV-Embed-v2), a
            Hugging Face model name, or a local folder. Loaded on the first `encode_text`.
    """

    def __init__(self, weight_file: str | Path | None = None, flat_features: bool = False,
                 num_classes: int | None = None, bf16: bool = False, trust: bool = False,
                 checkpoint: Checkpoint | None = None, text_encoder: str | Path | None = None):
        super().__init__()
        if checkpoint is None:
            if weight_file is None:
                raise ValueError('RuntimeM2D needs a weight_file (or m2d.load(NAME) for a released model)')
            checkpoint = load_checkpoint(weight_file, trust=trust)
        ckpt = checkpoint
        self.weight_file = str(ckpt.path)
        self.sample_rate = ckpt.sample_rate
        self.bf16 = bf16
        self.backbone = ViTEncoder(ckpt.vit)
        self.backbone.load_state_dict(ckpt.encoder, strict=True)
        self.backbone.requires_grad_(True)
        self.backbone.pos_embed.requires_grad_(False)
        if bf16:
            # Cast once. Autocast would re-cast every weight on every call under torch.inference_mode
            # (its cast cache is off there), which made bf16 slower than float32 on CPU.
            self.backbone.to(torch.bfloat16)
            pack_weights(self.backbone)
        self.register_buffer('norm_stats', torch.tensor(ckpt.norm_stats, dtype=torch.float32))
        self.to_spec = LogMelSpectrogram(preset(ckpt.sample_rate))

        D = ckpt.vit.embed_dim
        head_in = ckpt.head.get('mlp.mlp.0.weight')
        # An EVAR head trained on flat features takes D inputs; force flat features to match it.
        if num_classes is not None and head_in is not None and head_in.shape[1] == D:
            flat_features = True
        self.flat_features = flat_features
        self.feature_d = D if flat_features else D * ckpt.vit.grid_size[0]
        # Names of the head's outputs and how to score them (`predict`); see m2d.labels.head_labels.
        labels = head_labels(ckpt.meta, num_classes, ckpt.path.name) if num_classes is not None else None
        self.classes: list[str] | None = labels.classes if labels else None
        self.multilabel: bool = labels.multilabel if labels else False
        if num_classes is not None:
            self.head_norm = nn.BatchNorm1d(self.feature_d, affine=False)
            self.head = nn.Linear(self.feature_d, num_classes)
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
            if head_in is not None:
                self._load_head(ckpt, num_classes)
            else:
                log.info('%s has no EVAR head; the %d-class head is randomly initialized', ckpt.path.name, num_classes)

        # audio_proj: an MLP/Linear on the patch mean, or (2025) a semantic-token transformer on all patches
        self.audio_proj = semantic_audio_proj(ckpt.clap) or _linear_stack(ckpt.clap, 'audio_proj')
        self.text_proj = _linear_stack(ckpt.clap, 'text_proj')
        if self.audio_proj is None and self.text_proj is not None:
            self.audio_proj = nn.Identity()  # the reference's make_it_CLAP does so for files with text_proj only
        if 'logit_scale' in ckpt.clap:
            self.register_buffer('logit_scale', ckpt.clap['logit_scale'].clone())
        # The CLAP text side (`encode_text`) is loaded when first needed; see m2d.clap.
        self.text_encoder_name = text_encoder
        self._name_extra = ckpt.name_extra
        self._text_encoder_weights = ckpt.text_encoder or None
        self.eval()
        log.info('RuntimeM2D: %s, input %dx%d, patch %dx%d, %d Hz, norm_stats %.4f/%.4f, feature_d %d',
                 ckpt.path, *ckpt.vit.input_size, *ckpt.vit.patch_size, self.sample_rate,
                 *ckpt.norm_stats, self.feature_d)

    def _load_head(self, ckpt: Checkpoint, num_classes: int) -> None:
        w, b = ckpt.head['mlp.mlp.0.weight'], ckpt.head['mlp.mlp.0.bias']
        if w.shape != (num_classes, self.feature_d):
            raise ValueError(f'{ckpt.path}: the EVAR head is {tuple(w.shape)} (classes x features), '
                             f'but num_classes={num_classes} and feature_d={self.feature_d} were asked')
        self.head.load_state_dict({'weight': w, 'bias': b})
        self.head_norm.load_state_dict({'running_mean': ckpt.head['norm.running_mean'],
                                        'running_var': ckpt.head['norm.running_var'],
                                        'num_batches_tracked': ckpt.head.get('norm.num_batches_tracked',
                                                                             torch.tensor(0))})

    # ----- geometry -----------------------------------------------------------------------

    @property
    def cfg(self):
        """The encoder's ViTConfig (input_size, patch_size, embed_dim, ...)."""
        return self.backbone.config

    @property
    def frame_rate(self) -> float:
        """Output time steps per second (stacked features)."""
        return self.sample_rate / (self.to_spec.config.hop_length * self.cfg.patch_size[1])

    def compile(self) -> 'RuntimeM2D':
        """Compile the encoder with ``torch.compile`` (inductor, weights frozen) for long encoding jobs.

        The first call of each input shape compiles (about a minute for ViT-Base on 2 CPU cores);
        after that float32 encoding ran 1.27x faster on CPU here (2.98 vs 2.34 clips/s). Use it
        under ``torch.inference_mode()``. Returns self.
        """
        self.backbone.compile(dynamic=False, options={'freezing': True})
        return self

    # ----- the reference API ----------------------------------------------------------------

    def to_feature(self, batch_audio: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]`` in [-1, 1] -> log-mel ``[B, 1, 80, frames]`` (not normalized)."""
        return self.to_spec(batch_audio)

    def normalize_batch(self, lms: torch.Tensor) -> torch.Tensor:
        """Standardize with the checkpoint's ``norm_stats`` (mean, std)."""
        return (lms - self.norm_stats[0]) / self.norm_stats[1]

    def _stack(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., Fp*Tp, D]`` -> ``[..., Tp, Fp*D]`` (``b (f t) d -> b t (f d)``)."""
        fp = self.cfg.grid_size[0]
        *lead, L, D = x.shape
        x = x.reshape(*lead, fp, L // fp, D).transpose(-3, -2)
        return x.reshape(*lead, L // fp, fp * D)

    def _encode_chunks(self, chunks: torch.Tensor, return_layers: bool) -> list[torch.Tensor]:
        """Encode ``[N, 1, F, T]`` chunks of one length; returns per-layer ``[N, L, D]`` without cls."""
        outs = []
        dtype = self.backbone.patch_embed.proj.weight.dtype  # bfloat16 in bf16 mode
        for i in range(0, chunks.shape[0], MAX_CHUNKS_PER_PASS):
            y = self.backbone(chunks[i:i + MAX_CHUNKS_PER_PASS].to(dtype), return_layers=return_layers)
            y = y if return_layers else [y]
            outs.append([layer[:, 1:] for layer in y])
        return [torch.cat(parts) for parts in zip(*outs)]

    def encode_lms(self, lms: torch.Tensor, return_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Encode a normalized LMS ``[B, 1, 80, T]`` of any length.

        Inputs longer than the model's unit (e.g. 608 frames) are split into unit chunks (encoded
        together in one batch) and a right-padded remainder; chunk features are concatenated in time.
        Returns ``[B, T', Fp*D]`` (or ``[B, Fp*T', D]`` with flat_features), or a list of such
        tensors, one per layer, with `return_layers` (the last one after the final norm).
        """
        if lms.dim() == 3:
            lms = lms[:, None]
        B, unit, pw = lms.shape[0], self.cfg.input_size[1], self.cfg.patch_size[1]
        # Frames of a unit covered by whole patches: the unit itself, except for units such as 1001
        # frames with 16-frame patches, whose last 9 frames the reference's patch embedding drops.
        used = self.cfg.grid_size[1] * pw
        n_full, rest = divmod(lms.shape[-1], unit)
        pieces = []  # per chunk: list over layers of [B, L, D]
        if n_full:
            full = lms[..., :n_full * unit].unflatten(-1, (n_full, unit))[..., :used].permute(3, 0, 1, 2, 4)
            layers = self._encode_chunks(full.reshape(n_full * B, *full.shape[2:]), return_layers)
            pieces += [[layer[c * B:(c + 1) * B] for layer in layers] for c in range(n_full)]
        if rest:
            # Padded to whole patches, but never past the unit's whole patches: a 1001-frame model's
            # remainder of 993-1000 frames keeps 62 patches, as the reference's unit-sized slice does.
            tail = nn.functional.pad(lms[..., n_full * unit:], (0, (pw - rest % pw) % pw))[..., :used]
            pieces.append(self._encode_chunks(tail, return_layers))
        per_layer = []
        for layer_chunks in zip(*pieces):
            chunks = [c.float() if self.flat_features else self._stack(c.float()) for c in layer_chunks]
            per_layer.append(torch.cat(chunks, dim=1))
        return per_layer if return_layers else per_layer[0]

    def encode(self, batch_audio: torch.Tensor, return_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Waveforms -> log-mel -> normalized -> features (see `encode_lms`).

        Without gradients, waveforms longer than `STREAM_WINDOWS` model windows take the bounded path
        (`iter_encode`) into a preallocated output: memory is the output plus one pass of the model.
        """
        hop = self.to_spec.config.hop_length
        if torch.is_grad_enabled() or batch_audio.shape[-1] // hop < STREAM_WINDOWS * self.cfg.input_size[1]:
            return self.encode_lms(self.normalize_batch(self.to_feature(batch_audio)), return_layers=return_layers)
        batch = batch_audio if batch_audio.dim() == 2 else batch_audio[None]
        steps = feature_frames(self, 1 + batch.shape[-1] // hop)
        outs, t = None, 0
        for y in self.iter_encode(batch, return_layers=return_layers):
            pieces = y if return_layers else [y]
            if outs is None:
                outs = [p.new_empty(p.shape[0], steps, p.shape[-1]) for p in pieces]
            for out, p in zip(outs, pieces):
                out[:, t:t + p.shape[1]] = p
            t += pieces[0].shape[1]
        return outs if return_layers else outs[0]

    def iter_encode(self, audio: torch.Tensor | Iterable[torch.Tensor | np.ndarray], return_layers: bool = False,
                    windows_per_pass: int = STREAM_WINDOWS) -> Iterator[torch.Tensor | list[torch.Tensor]]:
        """`encode` for recordings of any length, piece by piece in bounded memory.

        `audio`: a waveform ``[samples]`` / ``[B, samples]`` or an iterable of such blocks in order (e.g.
        ``m2d.audio.stream_audio(path, rt.sample_rate)``). Yields ``[B, t', D']`` pieces (lists over
        layers with `return_layers`), `windows_per_pass` model windows at a time, whose concatenation
        along time equals `encode` of the whole waveform. Run it under ``torch.inference_mode()``.
        """
        if isinstance(audio, (torch.Tensor, np.ndarray)):
            audio = waveform_blocks(audio, windows_per_pass * self.cfg.input_size[1] * self.to_spec.config.hop_length)
        for pieces in encode_stream(self, audio, return_layers=return_layers, windows_per_pass=windows_per_pass):
            yield pieces if return_layers else pieces[0]

    def forward(self, batch_audio: torch.Tensor) -> torch.Tensor:
        """Logits when a head was built (`num_classes`), else the features of `encode`."""
        x = self.encode(batch_audio)
        if not hasattr(self, 'head'):
            return x
        return self.head(self.head_norm(x.mean(1)))

    @torch.no_grad()
    def predict(self, batch_audio: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, num_classes]`` of a fine-tuned runtime: sigmoid of the logits when
        `multilabel` (e.g. AudioSet), else softmax. Names of the columns: `classes`."""
        if not hasattr(self, 'head'):
            raise ValueError(f'{self.weight_file} has no classification head; create the runtime with '
                             'num_classes (a fine-tuned file), or use encode() for features')
        logits = self(batch_audio.to(self.norm_stats.device)).float()
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)

    def get_scene_embeddings(self, batch_audio: torch.Tensor) -> torch.Tensor:
        """One vector per clip: the time average of `encode` ``[B, feature_d]``."""
        return self.encode(batch_audio).mean(1)

    def get_timestamp_embeddings(self, batch_audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` features and the centre of each time step in milliseconds ``[B, T']``."""
        x = self.encode(batch_audio)
        if self.flat_features:
            raise ValueError('timestamps need stacked features; create the runtime with flat_features=False')
        step_ms = 1000.0 / self.frame_rate
        ts = (torch.arange(x.shape[1], device=x.device, dtype=torch.float32) + 0.5) * step_ms
        return x, ts.expand(x.shape[0], -1)

    # ----- M2D-CLAP ---------------------------------------------------------------------------

    @property
    def is_clap(self) -> bool:
        """Whether the file is an M2D-CLAP one (it has ``audio_proj``)."""
        return self.audio_proj is not None

    def _require_clap(self) -> None:
        if not self.is_clap:
            raise ValueError(f'{self.weight_file} has no audio_proj; it is not an M2D-CLAP weight file')

    def encode_clap_audio(self, batch_audio: torch.Tensor) -> torch.Tensor:
        """M2D-CLAP audio embedding: ``audio_proj`` of the mean over all patch features (2025 files: the
        semantic projector reads all patch features, whose order does not matter to it)."""
        self._require_clap()
        x = self.encode(batch_audio)
        patches = x.reshape(x.shape[0], -1, self.cfg.embed_dim)
        if isinstance(self.audio_proj, AudioToSemantic):
            return self.audio_proj(patches)
        return self.audio_proj(patches.mean(1))

    def encode_audio(self, batch_audio: torch.Tensor) -> torch.Tensor:
        """CLAP audio embeddings ``[B, D]`` of waveforms ``[B, samples]`` (= `encode_clap_audio`)."""
        return self.encode_clap_audio(batch_audio)

    def load_text_encoder(self, name_or_dir: str | Path | None = None) -> nn.Module:
        """Load (once) the CLAP text encoder: the one the file's name says (`m2d.clap.parse_clap_type`),
        or `name_or_dir` / the runtime's ``text_encoder`` argument; a ``...pTI`` file's own weights.
        Needs ``transformers`` (``pip install 'm2d[clap]'``)."""
        from .clap import ClapError, load_text_encoder, parse_clap_type, resolve_text_encoder, text_encoder_included

        self._require_clap()
        if name_or_dir is None and 'text_encoder' in self._modules:
            return self.text_encoder
        source = Path(self.weight_file).name
        clap_type, where = resolve_text_encoder(parse_clap_type(self._name_extra, source),
                                                name_or_dir or self.text_encoder_name)
        weights = None
        if text_encoder_included(self._name_extra, source):
            if not self._text_encoder_weights:
                raise ClapError(f'{self.weight_file}: the name says its text encoder is included (TI), but the file '
                                'holds no text_encoder.* weights')
            weights = self._text_encoder_weights
        elif self._text_encoder_weights:
            # A renamed file keeps its trained text encoder (the reference would take the hub's weights).
            log.info('%s: using the text encoder weights inside the file', source)
            weights = self._text_encoder_weights
        self.text_encoder = load_text_encoder(clap_type, where, weights, source).to(self.norm_stats.device)
        return self.text_encoder

    def encode_text(self, texts: str | list[str], truncate: bool = False, batch_size: int = 64) -> torch.Tensor:
        """CLAP text embeddings ``[N, D]`` (float32, on the runtime's device): the text encoder's sentence
        vectors, projected by ``text_proj`` when the file has one (the reference's ``encode_clap_text``).
        `truncate`: cut texts at 512 tokens instead of refusing them (the reference's default: refuse)."""
        from .clap import encode_texts

        encoder = self.load_text_encoder()
        x = encode_texts(encoder, texts, truncate, batch_size)
        x = x.to(self.norm_stats.device)
        return self.text_proj(x) if self.text_proj is not None else x

    def encode_clap_text(self, texts: str | list[str] | torch.Tensor) -> torch.Tensor:
        """`encode_text` of texts; given a tensor of sentence vectors ``[N, hidden]`` (computed elsewhere),
        only their ``text_proj`` projection (identity for files without one)."""
        self._require_clap()
        if not isinstance(texts, torch.Tensor):
            return self.encode_text(texts)
        return self.text_proj(texts) if self.text_proj is not None else texts

    @staticmethod
    def similarity(audio_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``[B, N]`` of CLAP audio ``[B, D]`` and text ``[N, D]`` embeddings (both
        L2-normalized, then a matrix product, as the reference's zero-shot notebook)."""
        from .clap import cosine_similarity

        return cosine_similarity(audio_emb.float(), text_emb.float().to(audio_emb.device))

    @property
    def clap_scale(self) -> float:
        """The factor of the CLAP logits: ``exp(logit_scale)`` of the file (the reference trains with
        ``logit_scale.exp() * cosine`` with ``logit_scale`` kept at most log 100 during training, so the
        stored value needs no clamp here); 1/0.07 for a file without ``logit_scale``."""
        from .clap import CLIP_INITIAL_LOGIT_SCALE

        if 'logit_scale' not in self._buffers:
            return CLIP_INITIAL_LOGIT_SCALE
        return float(self.logit_scale.float().exp())

    def zero_shot_probabilities(self, similarity: torch.Tensor) -> torch.Tensor:
        """Probabilities over the labels ``[B, N]``: softmax of ``clap_scale * similarity`` along the labels
        (the softmax of the reference's training logits, restricted to the given labels)."""
        return torch.softmax(self.clap_scale * similarity.float(), dim=-1)
