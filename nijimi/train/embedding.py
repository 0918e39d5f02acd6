"""``nijimi train-adapter --type embedding``: textual inversion (Gal et al., arXiv 2208.01618), as kohya's sd-scripts
(``train_textual_inversion.py``) trains it.

1. Load the base model and freeze all of it.
2. Make a new embedding of ``vectors`` vectors, each a copy of a token embedding of ``init_word`` (its tokens in
   turn, repeated when there are fewer than ``vectors``). It is named after the output file's stem — the word the
   captions use for the concept and prompts will use, since A1111 names an embedding by its file.
3. Train only those vectors on the diffusion loss (:class:`~nijimi.train.ldm.DiffusionObjective`): in every caption
   the name's tokens become the embedding's extra ids (:class:`~nijimi.text.vocabulary.ExtraVocabulary`), which the
   frozen text encoder looks up in the vectors (``extra=``), so gradients reach them through the frozen networks. The
   shared fine-tuning flow (:func:`~nijimi.train.finetune.run_finetune`) runs it; checkpoints hold the vectors alone.
4. Save an A1111/kohya ``.safetensors`` (``emb_params``; :func:`~nijimi.io.embeddings.save_embedding`), which
   ``--embeddings-dir`` / ``--embedding`` read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nijimi.errors import ConfigError
from nijimi.io.embeddings import save_embedding
from nijimi.models.ldm import LatentDiffusion
from nijimi.text.tokenizer import ClipTokenizer
from nijimi.text.vocabulary import ExtraVocabulary
from nijimi.train.adapter import EMBEDDING, AdapterTrainConfig, open_adapter_data
from nijimi.train.finetune import FineTuning, SampleFn, TrainedPart, load_base, run_finetune
from nijimi.train.ldm import DiffusionObjective
from nijimi.train.trainer import OnStep, open_trainer

CHECKED_CAPTIONS = 16
"""Captions of the data looked at for the embedding's name before training (one of them must name it)."""


def initial_vectors(model: LatentDiffusion, tokenizer: ClipTokenizer, init_word: str, count: int) -> torch.Tensor:
    """``count`` vectors ``(count, width)``: the token embeddings of ``init_word``'s tokens in turn (kohya's init)."""
    tokens = tokenizer.encode(init_word)
    if not tokens:
        raise ConfigError(f"init word {init_word!r} has no tokens")
    table = model.text_encoder.text_model.embeddings.token_embedding.weight.detach()
    return torch.stack([table[tokens[i % len(tokens)]] for i in range(count)]).float().clone()


class CaptionsWithEmbedding(DiffusionObjective):
    """The diffusion loss of a frozen model whose captions name a trained embedding: ``vocabulary`` knows only it,
    its extra ids index ``vectors`` (the trained parameter)."""

    def __init__(self, vocabulary: ExtraVocabulary, vectors: nn.Parameter, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vocabulary, self.vectors = vocabulary, vectors

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer.windows([self.vocabulary.substitute(self.tokenizer.encode(c)) for c in captions])
        return self.text_encoder(ids, extra=self.vectors)


class EmbeddingObjective(TrainedPart):
    """What the trainer trains: ``vectors`` ``(n, width)`` is this module's only parameter, so checkpoints and the EMA
    hold the embedding alone; the frozen model's loss (:class:`CaptionsWithEmbedding`) stays outside the module."""

    def __init__(self, objective: CaptionsWithEmbedding, vectors: nn.Parameter) -> None:
        super().__init__(objective)
        self.vectors = vectors


@dataclass
class EmbeddingTraining(FineTuning):
    """A prepared run: the frozen model, the data, the embedding's ``name`` and the trainer of its vectors."""

    model: LatentDiffusion
    data: object
    name: str

    title = "embedding"

    def sample_grid(self, sample_fn: SampleFn) -> tuple[list, None]:
        """The sample prompts (``cfg.sample_prompts`` or the data's first four captions) drawn with the embedding as
        it is now (written to the work folder as ``NAME.safetensors``)."""
        prompts = list(self.cfg.sample_prompts) or [self.data[i][1] for i in range(min(4, len(self.data)))]
        current = self.cfg.work_dir / f"{self.name}.safetensors"
        current.parent.mkdir(parents=True, exist_ok=True)
        self.save(current, overwrite=True)  # the vectors as they are now, for the sample grid
        return sample_fn(self.model, prompts, self.cfg.sample_steps, self.cfg.seed, embeddings=(str(current),)), None

    def save(self, out: Path, overwrite: bool = False) -> None:
        """The vectors as an A1111/kohya ``.safetensors`` embedding (float16 with ``cfg.half``); an existing ``out``
        is replaced only with ``overwrite``."""
        save_embedding(self.trainer.module.vectors, out, half=self.cfg.half, overwrite=overwrite)


def _check_captions(data, vocabulary: ExtraVocabulary, tokenizer: ClipTokenizer, name: str, source: str) -> None:
    for i in range(min(CHECKED_CAPTIONS, len(data))):
        tokens = tokenizer.encode(data[i][1])
        if any(vocabulary.match(tokens, k) for k in range(len(tokens))):
            return
    raise ConfigError(f"no caption of {source} (of the first {CHECKED_CAPTIONS}) names the embedding {name!r}, which "
                      "is named after the output file; name the file after the word the captions use")


def prepare_embedding_training(cfg: AdapterTrainConfig, model: LatentDiffusion | None = None, data=None,
                               resume: bool = False) -> EmbeddingTraining:
    """Load (or take) the base model and data, freeze the model, make the vectors, build the trainer; with
    ``resume``, continue from ``work_dir/checkpoint.pt`` when it exists."""
    if cfg.type != EMBEDDING or cfg.format != "kohya":
        raise ConfigError(f"textual inversion is --type {EMBEDDING}, saved in kohya's (A1111's) format; got type "
                          f"{cfg.type!r}, format {cfg.format!r}")
    model = load_base(cfg.base) if model is None else model
    model.requires_grad_(False)
    data = open_adapter_data(cfg, model.config) if data is None else data
    tokenizer, name = model.config.tokenizer(), Path(cfg.out).stem
    vectors = nn.Parameter(initial_vectors(model, tokenizer, cfg.init_word, cfg.vectors))
    vocabulary = ExtraVocabulary(tokenizer, [name], lambda _: vectors)
    vocabulary.ids(name)  # the vectors are the vocabulary's rows 0..n-1
    _check_captions(data, vocabulary, tokenizer, name, cfg.data)
    objective = CaptionsWithEmbedding(vocabulary, vectors, model, data, caption_dropout=cfg.caption_dropout,
                                      min_snr_gamma=cfg.min_snr_gamma or None, train_text_encoder=False,
                                      mask_loss=cfg.mask_loss)
    trainer = open_trainer(EmbeddingObjective(objective, vectors), len(data), cfg, cfg.work_dir, resume,
                           "was made for another embedding (vector count or width differ)")
    return EmbeddingTraining(cfg, trainer, model, data, name)


def train_embedding(cfg: AdapterTrainConfig, *, resume: bool = False, overwrite: bool = False,
                    on_step: OnStep | None = None, sample_fn: SampleFn | None = None,
                    model: LatentDiffusion | None = None, data=None) -> EmbeddingTraining:
    """Run the whole recipe (see the module docstring) with :func:`run_finetune`; returns the finished run.

    ``model``/``data`` replace loading ``cfg.base``/``cfg.data``. Sample grids (with ``sample_fn``) are made at
    step 0 — the init word's vectors — and every ``sample_every`` steps.
    """
    return run_finetune(cfg, lambda: prepare_embedding_training(cfg, model, data, resume), resume=resume,
                        overwrite=overwrite, on_step=on_step, sample_fn=sample_fn)
