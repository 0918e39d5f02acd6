"""A sampler and a schedule, chosen independently (A1111 ≥ 1.9's "Sampler" and "Schedule type", ComfyUI's
``sampler_name`` and ``scheduler``) and parsed once into a :class:`SamplerChoice`; nothing downstream looks at the
names again.

Sampler names: nijimi's (``dpm++2m``), A1111's display names (``DPM++ 2M``, ``Euler a``) and ``k_`` aliases,
ComfyUI's (``dpmpp_2m``, ``euler_ancestral``, ``uni_pc``), case, spaces, ``-`` and ``_`` ignored. Schedule names:
nijimi's / ComfyUI's (``sgm_uniform``, ``ddim_uniform``, ``normal``) and A1111's labels (``SGM Uniform``, ``DDIM``,
``Align Your Steps``). ``automatic`` is the sampler's default (:data:`SAMPLER_SPECS`: A1111's Karras for DPM++ 2M,
DPM++ SDE, DPM++ 2S a, DPM2 and DPM2 a; exponential for DPM++ 2M SDE and DPM++ 3M SDE; LCM's own timesteps for lcm
and tcd; the model's own timesteps, ``uniform``, for the rest). Old combined names (``DPM++ 2M Karras``,
``dpm++2m-karras``, ``euler-trailing``) still parse, into the sampler plus the named schedule.

"Uniform" means two things. nijimi's ``uniform`` is the model's own timesteps (its ``timestep_spacing``, as its
diffusers scheduler picks them: 951, 901, …, 1 for SD's "leading" config at 20 steps). A1111's "Uniform" is
k-diffusion's ``DiscreteSchedule.get_sigmas``, timesteps evenly from T-1 to 0 with σ interpolated in log σ: nijimi's
``normal`` (ComfyUI's "normal"). So A1111's label ``Uniform`` (capitalised, as A1111 writes it) parses to ``normal``,
while ``uniform`` stays nijimi's; and A1111's "Automatic" in an infotext is what A1111 ran: ``get_sigmas`` (normal)
for the samplers it gives no schedule of their own (Euler, Euler a, Heun, LMS), the sampler's table entry otherwise
(:func:`choice_from_infotext`). nijimi labels its ``uniform`` "Model timesteps": a label A1111 does not know, which
its ``get_sampler_and_scheduler`` reads as Automatic (``get_sigmas``, its nearest schedule, for the samplers that
default to ``uniform``), and ComfyUI's A1111 importer ignores (it reads the sampler name only: Karras if the name
says so, else "normal", the same nearest schedule); nijimi reads it back as ``uniform``.

``ddim`` is diffusers' ``DDIMScheduler`` read from the model's ``scheduler_config.json``: the model's timesteps,
each step landing at ᾱ of t - T//N, the last at ᾱ_0 (σ_0, not 0) when ``set_alpha_to_one`` is false, as SD 1.x/2.x
say (:meth:`SamplerChoice.options`); on other schedules it is k-diffusion-style DDIM down to σ = 0. A1111's "DDIM"
(``modules/sd_samplers_timesteps_impl.py``, 1.6 and later) is its own loop over the model's ᾱ's and ignores the
Schedule type: timesteps 1 + k·(T//N), of which it evaluates all but the lowest (N - 1 network calls when N
divides T), ending at ᾱ of timestep 1. On SD's "leading" config nijimi's ``ddim`` walks the same timesteps with one
more call and ends at ᾱ_0: the same picture, not the same pixels. nijimi keeps one DDIM, diffusers' (the one with a
parity reference), and reads A1111's "DDIM" as it.

A1111's per-sampler options come with the sampler: Brownian-tree noise for the SDE samplers (DPM++ SDE, DPM++ 2M
SDE, DPM++ 3M SDE), and "discard next to last sigma" for DPM2, DPM2 a and DPM++ 3M SDE (the schedule is made for
steps + 1 and its next-to-last σ dropped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from nijimi.diffusion import samplers as s
from nijimi.diffusion import singlestep as ss
from nijimi.diffusion.noise import BrownianNoise, Generators, gaussian_noise
from nijimi.diffusion.samplers import NoiseSampler
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.diffusion.sigmas import SCHEDULES, SigmaPlan, schedule_sigmas
from nijimi.errors import SamplerError


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler's function and defaults: A1111 ``display`` name, extra ``aliases``, the schedule ``family`` of
    :mod:`nijimi.diffusion.sigmas`, the ``automatic`` schedule, its ``noise`` ("gaussian", "brownian" or None),
    whether its diffusers scheduler starts from variance-preserving noise (``vp_start``), whether it has an η,
    whether A1111 discards the next-to-last σ, and whether it works on the training timesteps (``grid``)."""

    fn: Callable[..., torch.Tensor]
    display: str
    family: str
    automatic: str = "uniform"
    noise: str | None = None
    vp_start: bool = False
    eta: bool = False
    discard_penultimate: bool = False
    grid: bool = False
    aliases: tuple[str, ...] = ()


SAMPLER_SPECS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(s.sample_ddpm, "DDPM", "ddim", noise="gaussian", vp_start=True),
    "ddim": SamplerSpec(s.sample_ddim, "DDIM", "ddim", noise="gaussian", vp_start=True, eta=True),
    "euler": SamplerSpec(s.sample_euler, "Euler", "euler"),
    "euler-a": SamplerSpec(s.sample_euler_ancestral, "Euler a", "euler", noise="gaussian", eta=True,
                           aliases=("eulerancestral",)),
    "heun": SamplerSpec(s.sample_heun, "Heun", "euler"),
    "lms": SamplerSpec(s.sample_lms, "LMS", "euler"),
    "dpm2": SamplerSpec(ss.sample_dpm_2, "DPM2", "kdpm2", "karras", discard_penultimate=True),
    "dpm2-a": SamplerSpec(ss.sample_dpm_2_ancestral, "DPM2 a", "kdpm2", "karras", "gaussian", eta=True,
                          discard_penultimate=True, aliases=("dpm2ancestral",)),
    "dpm++2s-a": SamplerSpec(ss.sample_dpmpp_2s_ancestral, "DPM++ 2S a", "kdiffusion", "karras", "gaussian",
                             eta=True, aliases=("dpmpp2sancestral",)),
    "dpm++2s": SamplerSpec(ss.sample_dpmpp_2s, "DPM++ 2S", "singlestep", vp_start=True,
                           aliases=("dpmsolversinglestep",)),
    "dpm++sde": SamplerSpec(ss.sample_dpmpp_sde, "DPM++ SDE", "kdiffusion", "karras", "brownian", eta=True,
                            aliases=("dpmppsdegpu",)),
    "dpm++2m": SamplerSpec(s.sample_dpmpp_2m, "DPM++ 2M", "multistep", "karras", vp_start=True),
    "dpm++2m-sde": SamplerSpec(s.sample_dpmpp_2m_sde, "DPM++ 2M SDE", "multistep", "exponential", "brownian",
                               vp_start=True, eta=True, aliases=("dpmpp2msdegpu",)),
    "dpm++3m-sde": SamplerSpec(s.sample_dpmpp_3m_sde, "DPM++ 3M SDE", "kdiffusion", "exponential", "brownian",
                               eta=True, discard_penultimate=True, aliases=("dpmpp3msdegpu",)),
    "unipc": SamplerSpec(s.sample_unipc, "UniPC", "multistep", vp_start=True, aliases=("unipcbh2",)),
    "lcm": SamplerSpec(s.sample_lcm, "LCM", "ddim", "lcm", "gaussian", vp_start=True, grid=True),
    "tcd": SamplerSpec(s.sample_tcd, "TCD", "ddim", "lcm", "gaussian", vp_start=True, eta=True, grid=True),
}
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {name: spec.fn for name, spec in SAMPLER_SPECS.items()}

SCHEDULE_LABELS = {"automatic": "Automatic", "uniform": "Model timesteps", "karras": "Karras",
                   "exponential": "Exponential", "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform",
                   "kl_optimal": "KL Optimal", "align_your_steps": "Align Your Steps", "simple": "Simple",
                   "normal": "Normal", "ddim_uniform": "DDIM", "beta": "Beta", "trailing": "Trailing", "lcm": "LCM"}
"""Each schedule's A1111 label (the ``Schedule type`` infotext value); "Model timesteps", "Trailing" and "LCM" are
nijimi's. A1111's "Uniform" is ``normal`` (see the module docstring)."""
A1111_UNIFORM = "Uniform"
"""A1111's label of k-diffusion's ``get_sigmas`` schedule, nijimi's ``normal``."""
_A1111_GET_SIGMAS = ("euler", "euler-a", "heun", "lms")
"""The samplers A1111 runs on ``get_sigmas`` (its Uniform) when the schedule is Automatic: A1111's sampler table
gives them no schedule of their own."""


_LEGACY_COMBINED = {"karras": ("lms", "dpm2", "dpm2-a", "dpm++2s-a", "dpm++2m", "dpm++sde", "dpm++2m-sde",
                               "dpm++3m-sde"),
                    "exponential": ("dpm++2m-sde", "dpm++3m-sde")}
"""The samplers A1111 before 1.9 listed with a schedule in their name ("DPM++ 2M Karras")."""


def _key(name: str) -> str:
    """Spelling-insensitive key: lower case, ``++`` as ``pp``, no spaces, ``-`` or ``_``, no A1111 ``k_`` prefix."""
    key = name.strip().lower()
    key = key[2:] if key.startswith("k_") else key
    return re.sub(r"[\s\-_]+", "", key.replace("++", "pp"))


_SAMPLER_KEYS = {_key(alias): name for name, spec in SAMPLER_SPECS.items()
                 for alias in (name, spec.display, *spec.aliases)}
_SCHEDULE_KEYS = {**{_key(name): name for name in SCHEDULE_LABELS}, **{_key(label): name for name, label in
                                                                        SCHEDULE_LABELS.items()},
                  "ays": "align_your_steps", "sgmuniform": "sgm_uniform", "ddimuniform": "ddim_uniform"}


def parse_schedule(name: str) -> str:
    """The canonical schedule name (``automatic`` included) for any accepted spelling; A1111's label ``Uniform`` is
    ``normal`` (see the module docstring)."""
    if isinstance(name, str) and name.strip() == A1111_UNIFORM:
        return "normal"
    key = _key(name) if isinstance(name, str) else None
    if key not in _SCHEDULE_KEYS:
        known = ", ".join(SCHEDULE_LABELS)
        raise SamplerError(f"unknown schedule {name!r}; known: {known} (or A1111 labels like 'SGM Uniform')")
    return _SCHEDULE_KEYS[key]


def split_sampler_name(name: str) -> tuple[str, str | None]:
    """(canonical sampler, the schedule an old combined name carries or None): ``"DPM++ 2M Karras"`` →
    ``("dpm++2m", "karras")``, ``"euler-a"`` → ``("euler-a", None)``."""
    if not isinstance(name, str):
        raise SamplerError(f"sampler {name!r} must be a name (a string)")
    if _key(name) in _SAMPLER_KEYS:
        return _SAMPLER_KEYS[_key(name)], None
    words = [w for w in re.split(r"[\s\-_]+", name.strip()) if w]
    for cut in range(len(words) - 1, 0, -1):
        base, schedule = _key("".join(words[:cut])), _key("".join(words[cut:]))
        if base in _SAMPLER_KEYS and schedule in _SCHEDULE_KEYS and _SCHEDULE_KEYS[schedule] != "automatic":
            return _SAMPLER_KEYS[base], _SCHEDULE_KEYS[schedule]
    known = ", ".join(SAMPLER_SPECS)
    raise SamplerError(f"unknown sampler {name!r}; known: {known} (or A1111 / ComfyUI names like 'DPM++ 2M', "
                       "'dpmpp_2m')")


@dataclass(frozen=True)
class SamplerChoice:
    """One sampler with one (resolved, never ``automatic``) schedule; build it with :func:`parse_sampler`. Two
    choices are equal when their names are. ``fn`` is the sampling function."""

    base: str
    schedule: str = "uniform"
    fn: Callable[..., torch.Tensor] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base not in SAMPLER_SPECS or self.schedule not in SCHEDULES:
            raise SamplerError(f"no sampler {self.base!r} with schedule {self.schedule!r}")
        object.__setattr__(self, "fn", SAMPLER_SPECS[self.base].fn)

    @property
    def spec(self) -> SamplerSpec:
        """The sampler's function and defaults."""
        return SAMPLER_SPECS[self.base]

    @property
    def name(self) -> str:
        """nijimi's sampler name: ``"dpm++2m"``."""
        return self.base

    @property
    def display(self) -> str:
        """A1111's sampler name (the ``Sampler`` infotext value): ``"DPM++ 2M"``."""
        return self.spec.display

    @property
    def infotext_name(self) -> str:
        """The ``Sampler`` value nijimi writes: :attr:`display`, with the schedule appended where A1111 before 1.9
        had that combined name ("DPM++ 2M Karras"), so ComfyUI's A1111 importer, which reads no ``Schedule type``,
        gets the schedule too; A1111 ≥ 1.9 reads either form with the ``Schedule type`` beside it."""
        if self.base in _LEGACY_COMBINED.get(self.schedule, ()):
            return f"{self.display} {SCHEDULE_LABELS[self.schedule]}"
        return self.display

    @property
    def schedule_label(self) -> str:
        """A1111's label of the schedule (the ``Schedule type`` infotext value): ``"Karras"``."""
        return SCHEDULE_LABELS[self.schedule]

    @property
    def takes_eta(self) -> bool:
        """Whether the sampler has an η (noise amount) option."""
        return self.spec.eta

    def plan(self, schedule: NoiseSchedule, steps: int) -> SigmaPlan:
        """The σ's (and network timesteps) this sampler walks for ``schedule`` and ``steps``
        (:func:`~nijimi.diffusion.sigmas.schedule_sigmas`), the next-to-last σ discarded where A1111 does."""
        if not self.spec.discard_penultimate:
            return schedule_sigmas(schedule, steps, self.schedule, self.spec.family)
        plan = schedule_sigmas(schedule, steps + 1, self.schedule, self.spec.family)
        sigmas = torch.cat([plan.sigmas[:-2], plan.sigmas[-1:]])
        return SigmaPlan(sigmas, None if plan.timesteps is None else plan.timesteps[:-1])

    def sigmas(self, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
        """The σ's of :meth:`plan`: (N+1,) float32, usually N = ``steps``."""
        return self.plan(schedule, steps).sigmas

    def timestep_table(self, schedule: NoiseSchedule, steps: int) -> dict[float, float] | None:
        """{σ: network timestep} where diffusers rounds or truncates t(σ) (for the Denoiser), else None."""
        return self.plan(schedule, steps).timestep_table()

    def options(self, schedule: NoiseSchedule, eta: float | None, steps: int) -> dict:
        """The keyword options of ``fn`` for a model with ``schedule`` and a plan of ``steps`` steps: ``eta`` when
        given, the ``schedule`` itself for the samplers defined on the training timesteps (lcm, tcd), and DDIM's
        ``landing`` on the model's own timesteps (:meth:`SigmaPlan.landing_table
        <nijimi.diffusion.sigmas.SigmaPlan.landing_table>`: where diffusers' ``DDIMScheduler`` steps to, its last
        step ending at σ_0 when the config's ``set_alpha_to_one`` is false, as SD's say)."""
        options = ({} if eta is None else {"eta": eta}) | ({"schedule": schedule} if self.spec.grid else {})
        if self.base != "ddim":
            return options
        final = 0.0 if schedule.set_alpha_to_one else float(schedule.sigmas[0])
        landing = self.plan(schedule, steps).landing_table(final)
        return options | ({"landing": landing} if landing else {})

    def start_scale(self, sigma_max: float, schedule: NoiseSchedule) -> float:
        """The txt2img starting latent is unit noise times this: diffusers' ``init_noise_sigma`` carried to σ-space,
        ``sqrt(σ₀²+1)`` (the variance-preserving x_T = z) for the samplers whose scheduler starts there and for the
        Euler-type ones on "leading" timesteps; ``σ₀`` otherwise (Euler-type samplers on "linspace" or "trailing"
        timesteps or the ``trailing`` schedule, and the k-diffusion-only samplers, as A1111 starts them)."""
        if self.spec.family == "kdiffusion":
            return sigma_max
        spacing = "trailing" if self.schedule == "trailing" else schedule.timestep_spacing
        if self.spec.vp_start or spacing == "leading":
            return (sigma_max**2 + 1) ** 0.5
        return sigma_max

    def noise(self, x: torch.Tensor, sigma_max: float, generators: Generators) -> NoiseSampler | None:
        """The noise source of a stochastic sampler for latents like ``x`` (per-step Gaussian draws, or a Brownian
        tree over [0, σ_max]) from the images' generators; None for a deterministic one."""
        if self.spec.noise == "brownian":
            return BrownianNoise(x, sigma_max, generators, self.name)
        return gaussian_noise(x, generators, self.name) if self.spec.noise else None


def parse_sampler(name: str, schedule: str = "automatic") -> SamplerChoice:
    """The choice for a sampler name and a schedule name: ``("DPM++ 2M", "Karras")``, ``("euler", "automatic")``;
    an old combined name (``"dpm++2m-karras"``) brings its schedule, which an explicit other one contradicts."""
    base, carried = split_sampler_name(name)
    asked = parse_schedule(schedule)
    if carried and asked not in ("automatic", carried):
        raise SamplerError(f"sampler {name!r} names the schedule {carried!r}, but the schedule is {asked!r}")
    return SamplerChoice(base, carried or (SAMPLER_SPECS[base].automatic if asked == "automatic" else asked))


def choice_from_infotext(settings: Mapping[str, object]) -> SamplerChoice:
    """The choice an A1111 infotext states, read as A1111 ≥ 1.9 reads it: ``Sampler`` plus ``Schedule type``, or
    an older combined ``Sampler`` value such as ``DPM++ 2M Karras``; a missing or "Automatic" schedule is what A1111
    runs then (Euler, Euler a, Heun, LMS: its Uniform, nijimi's ``normal``; the others: their automatic schedule)."""
    sampler = settings.get("Sampler")
    if not isinstance(sampler, str):
        raise SamplerError(f"infotext has no Sampler (got {sampler!r})")
    schedule = str(settings.get("Schedule type") or "automatic")
    base, carried = split_sampler_name(sampler)
    if not carried and parse_schedule(schedule) == "automatic" and base in _A1111_GET_SIGMAS:
        schedule = A1111_UNIFORM
    return parse_sampler(sampler, schedule)


def default_sampler(schedule: NoiseSchedule, name: str = "automatic") -> SamplerChoice:
    """The sampler used when none is named, with the schedule ``name``: DPM++ 2M (Karras when automatic), A1111's
    usual choice; but DPM++ 2M on the model's own timesteps for a zero-terminal-SNR schedule, whose σ_max ≈ 4096
    would put 13 of 20 Karras steps above σ = 14, where the image has no structure yet (2305.08891 samples such
    models on "trailing" timesteps)."""
    if parse_schedule(name) == "automatic" and schedule.rescale_zero_terminal_snr:
        return SamplerChoice("dpm++2m", "uniform")
    return parse_sampler("dpm++2m", name)
