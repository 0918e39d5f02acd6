"""``nijimi train-adapter``: teach a frozen model something new through a small adapter, with the shared trainer.

1. Load the base model (a checkpoint file, a diffusers folder or ``"embedded"``) and freeze it.
2. Inject a new adapter (:func:`nijimi.adapters.inject.inject`) of one of :data:`ADAPTER_TYPES` — LoRA (arXiv
   2106.09685), LoCon (LoRA on convolutions too), LoHa and LoKr (LyCORIS, 2309.14859), DoRA (2402.09353) — on the
   chosen layers of the U-Net, and of the text encoder with ``text_encoder``. It starts as the identity.
3. Train only its parameters on the diffusion loss (:class:`~nijimi.train.ldm.DiffusionObjective`; masked by the
   images' masks with ``mask_loss``) — or, for ``--type lcm``, on latent consistency distillation from the base model
   (:class:`~nijimi.train.consistency.ConsistencyObjective`, LCM-LoRA 2311.05556) — in the fine-tuning flow
   (:func:`~nijimi.train.finetune.run_finetune`); checkpoints hold the adapter alone (:class:`AdapterObjective`).
4. Save it (EMA weights) as a kohya file with ``ss_*`` training metadata (an LCM adapter also names its sampler,
   :data:`LCM_SAMPLER_KEY`) or a diffusers/peft file.

The shapes world gets a new concept for a demo: ``data = "shapes-pink"`` is
:class:`~nijimi.train.shapes.ConceptShapes`, 64 scenes whose first object is pink, a colour the base world never shows.

``reg_data`` adds regularization images (kohya's ``reg_data_dir``; DreamBooth's prior preservation, 2208.12242 §4.1
— with data of the base world standing in for images the base model made): one regularization image follows each
training image (:class:`WithRegularization`), so the adapter also learns to leave what the base already draws alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nijimi import __version__
from nijimi.adapters.formats import FORMATS, save_adapter
from nijimi.adapters.inject import adapted_layers, get_adapter, inject
from nijimi.adapters.targets import PRESETS, AdapterSpec
from nijimi.errors import ConfigError
from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.train.consistency import ConsistencyObjective, DistillSettings
from nijimi.train.finetune import (
    FineTuneConfig,
    FineTuning,
    SampleFn,
    TrainedPart,
    load_base,
    open_images,
    run_finetune,
)
from nijimi.train.ldm import DiffusionObjective
from nijimi.train.trainer import OnStep, open_trainer

ADAPTER_NAME = "default"
ADAPTER_TYPES: dict[str, dict] = {
    "lora": {"kind": "lora"},
    "locon": {"kind": "lora"},
    "loha": {"kind": "loha"},
    "lokr": {"kind": "lokr"},
    "dora": {"kind": "lora", "dora": True},
    "lcm": {"kind": "lora"},
}
"""``--type`` → :class:`AdapterSpec` fields. LoCon is a LoRA whose default targets include the convolutions; ``lcm``
is a LoRA (on the convolutions too, as LCM-LoRA) trained by latent consistency distillation instead of the diffusion
loss (:mod:`nijimi.train.consistency`)."""
EMBEDDING = "embedding"
"""``--type`` of textual inversion, which trains no adapter layers (:mod:`nijimi.train.embedding`)."""
DEFAULT_TARGETS = {"locon": "all", "lcm": "all"}
LCM_SAMPLER_KEY = "nijimi_sampler"
"""Metadata entry of an adapter trained with ``--type lcm``: the sampler it is made for (``lcm``)."""
"""Target preset per type when none is given (else ``attn+ff``, kohya's LoRA default)."""


@dataclass
class AdapterTrainConfig(FineTuneConfig):
    """Every setting of an adapter run, on top of :class:`FineTuneConfig`.

    ``type``: lora, locon, loha, lokr or dora. ``alpha`` 0 means alpha = rank (scale 1); ``conv_rank``/``conv_alpha``
    0 mean ``rank``/``alpha``. ``targets``: a preset (:data:`~nijimi.adapters.targets.PRESETS`) or comma-separated
    glob patterns over native module paths; empty means the type's default. ``sample_prompts`` empty: the first four
    captions of the data. ``reg_data``: regularization images (same kinds as ``data``; none when empty), one after
    each training image. ``text_encoder``: adapt the text encoder too. ``mask_loss``: weight the loss by each image's
    mask. ``format``: kohya (A1111, ComfyUI) or peft (diffusers). Type ``embedding`` is textual inversion
    (:mod:`nijimi.train.embedding`): ``vectors`` new vectors initialised from ``init_word``'s, named after ``out``'s
    stem (the word the captions and prompts use); the LoRA settings do not apply to it. ``type = "lcm"`` only:
    ``lcm_skip`` (timesteps per solver step), ``lcm_guidance`` (the teacher's CFG scale range), ``huber_c`` and
    ``target_ema`` (the EMA rate of the target network, 0: the student under stop-grad)
    (:class:`~nijimi.train.consistency.DistillSettings`).
    """

    out: str = "adapter.safetensors"
    reg_data: str = ""
    type: str = "lora"
    rank: int = 4
    alpha: float = 0.0
    conv_rank: int = 0
    conv_alpha: float = 0.0
    targets: str = ""
    factor: int = -1
    text_encoder: bool = False
    mask_loss: bool = False
    format: str = "kohya"
    sample_prompts: tuple = ()
    init_word: str = "*"
    vectors: int = 1
    lcm_skip: int = 20
    lcm_guidance: tuple = (4.0, 8.0)
    huber_c: float = 0.001
    target_ema: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.distill_settings()
        if self.type not in (*ADAPTER_TYPES, EMBEDDING):
            raise ConfigError(f"unknown adapter type {self.type!r}; choose one of {', '.join(ADAPTER_TYPES)}, "
                              f"{EMBEDDING}")
        if self.vectors < 1 or not self.init_word.strip():
            raise ConfigError(f"an embedding needs vectors ≥ 1 and an init word, got {self.vectors}, "
                              f"{self.init_word!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown adapter format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.rank < 1 or self.conv_rank < 0:
            raise ConfigError(f"rank must be ≥ 1 and conv_rank ≥ 0, got rank={self.rank}, conv_rank={self.conv_rank}")
        if self.alpha < 0 or self.conv_alpha < 0:
            raise ConfigError(f"alpha must be ≥ 0 (0: = rank), got alpha={self.alpha}, conv_alpha={self.conv_alpha}")

    def distill_settings(self) -> DistillSettings:
        """The LCM distillation settings (checked whatever the type, so a bad value fails before any work)."""
        if len(self.lcm_guidance) != 2:
            raise ConfigError(f"lcm_guidance must be two scales (low, high), got {self.lcm_guidance}")
        return DistillSettings(self.lcm_skip, tuple(float(g) for g in self.lcm_guidance), self.huber_c,
                               self.target_ema)

    def spec(self) -> AdapterSpec:
        """The adapter to inject."""
        targets = self.targets or DEFAULT_TARGETS.get(self.type, "attn+ff")
        if targets not in PRESETS:
            targets = tuple(p.strip() for p in targets.split(",") if p.strip())
        return AdapterSpec(rank=self.rank, alpha=self.alpha or None, targets=targets,
                           parts=("unet", "text") if self.text_encoder else ("unet",),
                           conv_rank=self.conv_rank or None, conv_alpha=self.conv_alpha or None, factor=self.factor,
                           **ADAPTER_TYPES[self.type])


class WithRegularization:
    """Training images interleaved with regularization images: ``dataset[2i]`` is ``data[i]`` and ``dataset[2i + 1]``
    is ``reg[i mod len(reg)]`` (kohya repeats its regularization images to as many as there are training images)."""

    def __init__(self, data, reg) -> None:
        self.data, self.reg = data, reg

    def __len__(self) -> int:
        return 2 * len(self.data)

    def __getitem__(self, index: int) -> tuple:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        return self.data[index // 2] if index % 2 == 0 else self.reg[index // 2 % len(self.reg)]


def open_adapter_data(cfg: AdapterTrainConfig, config: ModelConfig):
    """The training images at ``cfg.image_size`` for a model of ``config``, followed one by one by the
    regularization images of ``cfg.reg_data`` when it is given."""
    size = cfg.image_size(config)
    data = open_images(cfg.data, size, cfg.seed, cfg.data_count, captions=cfg.captions)
    return WithRegularization(data, open_images(cfg.reg_data, size, cfg.seed, cfg.data_count)) if cfg.reg_data else data


class AdapterObjective(TrainedPart):
    """What the trainer trains: the injected adapter's per-layer modules are this module's only sub-modules (keys
    ``layers.<module path with / for .>.<tensor>``), so checkpoints and the EMA hold the adapter alone (and an LCM
    run's EMA target network, ``target.*``); the frozen model's objective (:class:`DiffusionObjective` or
    :class:`ConsistencyObjective`) computes the loss and stays outside the module tree."""

    def __init__(self, objective: DiffusionObjective | ConsistencyObjective, model: LatentDiffusion,
                 name: str = ADAPTER_NAME) -> None:
        super().__init__(objective)
        self.layers = nn.ModuleDict({path.replace(".", "/"): layer.adapters[name]
                                     for path, layer in adapted_layers(model) if name in layer.adapters})
        self.target = getattr(objective, "target", None)


@dataclass
class AdapterTraining(FineTuning):
    """A prepared run: the model with the adapter injected (at ``paths``), the data, and the trainer of
    :class:`AdapterObjective`."""

    model: LatentDiffusion
    data: object
    paths: list[str]

    title = "adapter"

    def sample_grid(self, sample_fn: SampleFn) -> tuple[list, None]:
        """The sample prompts (``cfg.sample_prompts`` or the data's first four captions) drawn with the adapter."""
        prompts = list(self.cfg.sample_prompts) or [self.data[i][1] for i in range(min(4, len(self.data)))]
        return sample_fn(self.model, prompts, self.cfg.sample_steps, self.cfg.seed), None

    def save(self, out: Path, overwrite: bool = False) -> None:
        """The adapter as a ``cfg.format`` file with kohya's training metadata; an existing ``out`` is replaced only
        if ``overwrite``."""
        save_adapter(get_adapter(self.model, ADAPTER_NAME), out, self.model.config, self.cfg.format,
                     dtype=torch.float16 if self.cfg.half else None, metadata=training_metadata(self),
                     overwrite=overwrite)


def prepare_training(cfg: AdapterTrainConfig, model: LatentDiffusion | None = None, data=None,
                     resume: bool = False) -> AdapterTraining:
    """Load (or take) the base model and data, inject the adapter, build the trainer; with ``resume``, continue
    from ``work_dir/checkpoint.pt`` when it exists."""
    if cfg.type == EMBEDDING:
        raise ConfigError("an embedding is trained by nijimi.train.embedding.train_embedding, not train_adapter")
    model = load_base(cfg.base) if model is None else model
    data = open_adapter_data(cfg, model.config) if data is None else data
    lcm = cfg.type == "lcm"
    # the diffusion objective freezes the text encoder: made before the adapter, which may adapt it
    objective = None if lcm else DiffusionObjective(
        model, data, caption_dropout=cfg.caption_dropout, min_snr_gamma=cfg.min_snr_gamma or None,
        train_text_encoder=False, mask_loss=cfg.mask_loss)
    paths = inject(model, cfg.spec(), ADAPTER_NAME, torch.Generator().manual_seed(cfg.seed))
    if lcm:
        objective = ConsistencyObjective(model, ADAPTER_NAME, data, cfg.distill_settings())
    trainer = open_trainer(AdapterObjective(objective, model), len(data), cfg, cfg.work_dir, resume,
                           "was made for another adapter (type, rank or targets differ)")
    return AdapterTraining(cfg, trainer, model, data, paths)


def training_metadata(run: AdapterTraining) -> dict[str, str]:
    """kohya sd-scripts' ``ss_*`` training entries (the network ones come from :func:`save_adapter`)."""
    cfg = run.cfg
    size = run.data[0][0].shape[-1]
    reg = isinstance(run.data, WithRegularization)
    lcm = {LCM_SAMPLER_KEY: "lcm", "lcm_skip": str(cfg.lcm_skip), "lcm_guidance": repr(tuple(cfg.lcm_guidance)),
           "lcm_huber_c": repr(cfg.huber_c), "lcm_target_ema": repr(cfg.target_ema)} if cfg.type == "lcm" else {}
    return {**lcm, "ss_sd_model_name": Path(cfg.base).name, "ss_learning_rate": repr(cfg.lr),
            "ss_unet_lr": repr(cfg.lr),
            "ss_text_encoder_lr": repr(cfg.lr if cfg.text_encoder else 0.0), "ss_max_train_steps": str(cfg.steps),
            "ss_steps": str(run.trainer.step), "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_num_train_images": str(len(run.data.data if reg else run.data)),
            "ss_num_reg_images": str(len(run.data.reg) if reg else 0),
            "ss_resolution": f"({size}, {size})",
            "ss_seed": str(cfg.seed),
            "ss_lr_scheduler": "constant_with_warmup" if cfg.min_lr_ratio == 1 else "cosine_with_warmup",
            "ss_lr_warmup_steps": str(cfg.warmup_steps), "ss_min_snr_gamma": repr(cfg.min_snr_gamma or None),
            "ss_caption_dropout_rate": repr(cfg.caption_dropout), "ss_masked_loss": str(cfg.mask_loss),
            "ss_mixed_precision": "no", "ss_optimizer": "torch.optim.AdamW",
            "ss_training_comment": f"nijimi {__version__} train-adapter --type {cfg.type} --data {cfg.data}"
                                   + (f" --reg-data {cfg.reg_data}" if cfg.reg_data else "")}


def train_adapter(cfg: AdapterTrainConfig, *, resume: bool = False, overwrite: bool = False,
                  on_step: OnStep | None = None, sample_fn: SampleFn | None = None,
                  model: LatentDiffusion | None = None, data=None) -> AdapterTraining:
    """Run the whole recipe (see the module docstring) with :func:`run_finetune`; returns the finished run.

    ``model``/``data`` replace loading ``cfg.base``/``cfg.data``. Sample grids (with ``sample_fn``) are made at
    step 0 — the base model — and every ``sample_every`` steps.
    """
    return run_finetune(cfg, lambda: prepare_training(cfg, model, data, resume), resume=resume, overwrite=overwrite,
                        on_step=on_step, sample_fn=sample_fn)
