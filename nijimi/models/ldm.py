"""The whole latent diffusion model (LDM, arXiv 2112.10752): denoising U-Net, autoencoder and text encoder together.

The module tree is the key tree of an original Stable Diffusion single-file checkpoint (CompVis ``LatentDiffusion``):

- ``model.diffusion_model.*``: the U-Net (:class:`~nijimi.models.unet.UNetModel`);
- ``first_stage_model.*``: the autoencoder (:class:`~nijimi.models.vae.VAE`);
- ``cond_stage_model.transformer.*``: the CLIP text encoder (:class:`~nijimi.models.text_encoder.TextEncoder`).

So an SD 1.x file's tensors load with one strict ``load_state_dict`` once the extras it also carries (EMA copies,
schedule buffers, ``position_ids``) are dropped. SD 2.x files store the text encoder in OpenCLIP's layout
(``cond_stage_model.model.*``); ``nijimi.io.checkpoint`` renames those onto the same tree.

:class:`ModelConfig` describes all three parts plus what the weights alone do not say: the noise schedule and
prediction target the U-Net was trained with, how prompts are padded, and the guidance scale it samples best at.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import ConfigError
from nijimi.models.config import check_field_types, require_mapping
from nijimi.models.text_encoder import TextEncoder, TextEncoderConfig
from nijimi.models.unet import UNetConfig, UNetModel
from nijimi.models.vae import VAE, VAEConfig
from nijimi.text.tokenizer import ClipTokenizer

FAMILIES = ("sd1", "sd2", "custom")
"""``sd1``: CLIP ViT-L text encoder stored as ``cond_stage_model.transformer.*``; ``sd2``: OpenCLIP text encoder
stored as ``cond_stage_model.model.*``; ``custom``: any other model of these parts, stored like ``sd1``."""

SD1_PAD_TOKEN_ID = 49407
"""SD 1.x pads prompts with ``<|endoftext|>``."""
SD2_PAD_TOKEN_ID = 0
"""SD 2.x (OpenCLIP) pads prompts with id 0 (``!``)."""
DEFAULT_GUIDANCE = 7.0
"""The classifier-free guidance scale of a model whose file names none (A1111's default)."""
MAX_GUIDANCE = 100.0
"""The largest guidance scale a model may name as its default."""

UNET_PREFIX = "model.diffusion_model."
"""Where the U-Net sits in the key tree (:attr:`LatentDiffusion.unet`); the one place the top-level prefixes live."""
VAE_PREFIX = "first_stage_model."
"""Where the autoencoder sits in the key tree (:attr:`LatentDiffusion.vae`)."""
TEXT_PREFIX = "cond_stage_model.transformer."
"""Where the text encoder sits in the key tree (:attr:`LatentDiffusion.text_encoder`)."""

_CONFIG_FORMAT = 1


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the three networks, the training schedule, and the text conventions of a model.

    ``family`` (see :data:`FAMILIES`) fixes how the text encoder is laid out in a single file. The prediction target
    (``"epsilon"`` or ``"v_prediction"``, arXiv 2202.00512) lives in ``schedule.prediction_type``, the latent scaling
    factor in ``vae.scaling_factor``; both are also exposed here as properties. ``guidance`` is the classifier-free
    guidance scale a request without one uses (:class:`~nijimi.pipelines.request.GenerationRequest`): 7, A1111's and
    most tools' default, unless the model's file names another (its trainer measured it, as for the embedded model).
    """

    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    family: str = "custom"
    pad_token_id: int = SD1_PAD_TOKEN_ID
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule.sd)
    guidance: float = DEFAULT_GUIDANCE

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if self.unet.context_dim != self.text.width:
            raise ConfigError(f"ModelConfig: U-Net context_dim {self.unet.context_dim} does not match the text "
                              f"encoder width {self.text.width}")
        if self.unet.out_channels != self.vae.z_channels:
            raise ConfigError(f"ModelConfig: U-Net out_channels {self.unet.out_channels} does not match the VAE's "
                              f"z_channels {self.vae.z_channels}")
        if not 0 <= self.pad_token_id < self.text.vocab_size:
            raise ConfigError(f"ModelConfig.pad_token_id {self.pad_token_id} is outside the vocabulary "
                              f"0..{self.text.vocab_size - 1}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, int | float) \
                or not 0 <= self.guidance <= MAX_GUIDANCE:
            raise ConfigError(f"ModelConfig.guidance {self.guidance!r} must be a number within [0, {MAX_GUIDANCE}]")
        if self.schedule.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"ModelConfig: prediction_type {self.schedule.prediction_type!r} is not supported "
                              "(epsilon, v_prediction)")

    # ---- presets ----------------------------------------------------------------------------------------------

    @classmethod
    def sd15(cls) -> ModelConfig:
        """Stable Diffusion 1.x (v1-inference.yaml): ε-prediction, CLIP ViT-L/14, prompts padded with EOS."""
        return cls(UNetConfig.sd15(), VAEConfig.sd(), TextEncoderConfig.clip_l(), "sd1", SD1_PAD_TOKEN_ID)

    @classmethod
    def sd15_inpaint(cls) -> ModelConfig:
        """SD 1.5 inpainting: the U-Net takes 9 channels (latent, mask, masked-image latent)."""
        return dataclasses.replace(cls.sd15(), unet=UNetConfig.sd15_inpaint())

    @classmethod
    def sd15_pix2pix(cls) -> ModelConfig:
        """InstructPix2Pix: the U-Net takes 8 channels (latent, input-image latent)."""
        return dataclasses.replace(cls.sd15(), unet=UNetConfig.sd15_pix2pix())

    @classmethod
    def sd21(cls) -> ModelConfig:
        """Stable Diffusion 2.x base (512 px, ε): OpenCLIP ViT-H/14 used at its penultimate layer, padded with 0."""
        return cls(UNetConfig.sd21(), VAEConfig.sd(), TextEncoderConfig.openclip_h(), "sd2", SD2_PAD_TOKEN_ID)

    @classmethod
    def sd21_v(cls) -> ModelConfig:
        """Stable Diffusion 2.x 768 px: the ``sd21`` networks trained for v-prediction (arXiv 2202.00512)."""
        return cls(UNetConfig.sd21_v(), VAEConfig.sd(), TextEncoderConfig.openclip_h(), "sd2", SD2_PAD_TOKEN_ID,
                   NoiseSchedule.sd("v_prediction"))

    @classmethod
    def tiny(cls) -> ModelConfig:
        """The small model of the same architecture used by the embedded demo and fast tests."""
        return cls(UNetConfig.tiny(), VAEConfig.tiny(), TextEncoderConfig.tiny(), "custom", SD1_PAD_TOKEN_ID)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """The preset called ``name`` (``sd15``, ``sd15_inpaint``, ``sd15_pix2pix``, ``sd21``, ``sd21_v``, ``tiny``)."""
        presets = {"sd15": cls.sd15, "sd15_inpaint": cls.sd15_inpaint, "sd15_pix2pix": cls.sd15_pix2pix,
                   "sd21": cls.sd21, "sd21_v": cls.sd21_v, "tiny": cls.tiny}
        if name not in presets:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(presets)}")
        return presets[name]()

    # ---- derived values ---------------------------------------------------------------------------------------

    @property
    def prediction_type(self) -> str:
        """What the U-Net predicts: ``"epsilon"`` (the noise) or ``"v_prediction"`` (``v = α·ε − σ·x₀``)."""
        return self.schedule.prediction_type

    @property
    def scaling_factor(self) -> float:
        """Latents the U-Net sees are ``scaling_factor · z`` (LDM §4.3.2); 0.18215 for SD 1.x/2.x."""
        return self.vae.scaling_factor

    def with_prediction_type(self, prediction_type: str) -> ModelConfig:
        """The same model with another prediction target."""
        return dataclasses.replace(self, schedule=dataclasses.replace(self.schedule, prediction_type=prediction_type))

    def tokenizer(self) -> ClipTokenizer:
        """The CLIP tokenizer this model's prompts go through (its padding id and window length)."""
        return ClipTokenizer(pad_token_id=self.pad_token_id, max_length=self.text.max_positions)

    # ---- storage ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-ready dict; stored in the metadata of nijimi's own files so they reload exactly."""
        return {"format": _CONFIG_FORMAT, "family": self.family, "pad_token_id": self.pad_token_id,
                "unet": self.unet.to_dict(), "vae": self.vae.to_dict(), "text": self.text.to_dict(),
                "schedule": dataclasses.asdict(self.schedule), "guidance": self.guidance}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise :class:`ConfigError` naming them (``guidance``
        may be missing: files written before it was stored take :data:`DEFAULT_GUIDANCE`)."""
        expected = {"format", "family", "pad_token_id", "unet", "vae", "text", "schedule"}
        keys = set(require_mapping(d, "ModelConfig")) - {"guidance"}
        if keys != expected:
            raise ConfigError(f"ModelConfig dict: missing keys {sorted(expected - keys)}, "
                              f"unknown keys {sorted(keys - expected)}")
        if d["format"] != _CONFIG_FORMAT:
            raise ConfigError(f"ModelConfig dict format {d['format']!r} is not {_CONFIG_FORMAT}")
        check_field_types(cls, {k: v for k, v in d.items() if k != "format"})
        check_field_types(NoiseSchedule, require_mapping(d["schedule"], "ModelConfig.schedule"))
        try:
            schedule = NoiseSchedule(**d["schedule"])
        except TypeError as e:
            raise ConfigError(f"ModelConfig dict: bad schedule {d['schedule']!r}: {e}") from None
        return cls(UNetConfig.from_dict(d["unet"]), VAEConfig.from_dict(d["vae"]),
                   TextEncoderConfig.from_dict(d["text"]), d["family"], d["pad_token_id"], schedule,
                   d.get("guidance", DEFAULT_GUIDANCE))


class DiffusionWrapper(nn.Module):
    """The ``model.`` level of the key tree: holds ``diffusion_model``, the U-Net."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = unet


class TextConditioner(nn.Module):
    """The ``cond_stage_model.`` level of the key tree: holds ``transformer``, the text encoder."""

    def __init__(self, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.transformer = text_encoder


class LatentDiffusion(nn.Module):
    """U-Net, VAE and text encoder of one Stable Diffusion model, arranged as the single-file key tree.

    Use the parts through :attr:`unet`, :attr:`vae` and :attr:`text_encoder`; the pipelines do the sampling.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = VAE(config.vae)
        self.cond_stage_model = TextConditioner(TextEncoder(config.text))

    @property
    def unet(self) -> UNetModel:
        """The denoising U-Net ``model.diffusion_model``."""
        return self.model.diffusion_model

    @property
    def vae(self) -> VAE:
        """The autoencoder ``first_stage_model``."""
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder:
        """The CLIP text encoder ``cond_stage_model.transformer``."""
        return self.cond_stage_model.transformer

    def set_config(self, config: ModelConfig) -> None:
        """Replace what the weights do not fix: schedule, prediction target, padding, sample size, clip skip, scaling.

        Everything that shapes the networks must stay the same.
        """
        if self._shape_key(config) != self._shape_key(self.config):
            raise ConfigError("set_config cannot change the networks' architecture; build a new LatentDiffusion")
        self.config = config
        self.unet.config, self.vae.config, self.text_encoder.config = config.unet, config.vae, config.text

    @staticmethod
    def _shape_key(config: ModelConfig) -> tuple:
        unet = dataclasses.replace(config.unet, sample_size=0)
        vae = dataclasses.replace(config.vae, scaling_factor=1.0)
        text = dataclasses.replace(config.text, clip_skip=1)
        return unet, vae, text
