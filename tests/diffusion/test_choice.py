"""Sampler and schedule names: A1111's and ComfyUI's spellings, A1111's per-sampler defaults, and the infotext's
``Sampler`` / ``Schedule type`` written and read back to the same choice."""

import re

import pytest

from nijimi.diffusion.choice import (
    SAMPLER_SPECS,
    SCHEDULE_LABELS,
    SamplerChoice,
    choice_from_infotext,
    parse_sampler,
    parse_schedule,
)
from nijimi.errors import SamplerError
from nijimi.io.pngmeta import format_parameters, generation_settings, parse_parameters

# A1111 ≥ 1.9's samplers (modules/sd_samplers_kdiffusion.py) with the schedule A1111 runs for "Automatic": the
# sampler's table entry, else k-diffusion's get_sigmas (A1111's "Uniform", nijimi's normal).
A1111_DEFAULTS = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential",
                  "DPM++ 2S a": "karras", "DPM++ 3M SDE": "exponential", "Euler a": "normal", "Euler": "normal",
                  "LMS": "normal", "Heun": "normal", "DPM2": "karras", "DPM2 a": "karras"}
# A1111's schedule labels (modules/sd_schedulers.py, 1.10).
A1111_LABELS = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
COMFYUI = {"euler": "euler", "euler_ancestral": "euler-a", "heun": "heun", "dpm_2": "dpm2",
           "dpm_2_ancestral": "dpm2-a", "lms": "lms", "dpmpp_2s_ancestral": "dpm++2s-a", "dpmpp_sde": "dpm++sde",
           "dpmpp_sde_gpu": "dpm++sde", "dpmpp_2m": "dpm++2m", "dpmpp_2m_sde": "dpm++2m-sde",
           "dpmpp_2m_sde_gpu": "dpm++2m-sde", "dpmpp_3m_sde": "dpm++3m-sde", "ddpm": "ddpm", "lcm": "lcm",
           "ddim": "ddim", "uni_pc": "unipc", "uni_pc_bh2": "unipc"}


def test_a1111_names_and_automatic_schedules():
    """An infotext's Automatic is what A1111 ran; nijimi's own ``automatic`` differs only for the samplers A1111
    gives no schedule (Euler, Euler a, Heun, LMS): the model's own timesteps, as their diffusers schedulers."""
    for display, schedule in A1111_DEFAULTS.items():
        for written in ({"Sampler": display}, {"Sampler": display, "Schedule type": "Automatic"}):
            choice = choice_from_infotext(written)
            assert (choice.display, choice.schedule) == (display, schedule)
        assert parse_sampler(display).schedule == ("uniform" if schedule == "normal" else schedule)
    brownian = {name for name, spec in SAMPLER_SPECS.items() if spec.noise == "brownian"}
    discard = {name for name, spec in SAMPLER_SPECS.items() if spec.discard_penultimate}
    assert brownian == {"dpm++sde", "dpm++2m-sde", "dpm++3m-sde"} and discard == {"dpm2", "dpm2-a", "dpm++3m-sde"}


def test_comfyui_sampler_and_scheduler_names():
    for comfy, ours in COMFYUI.items():
        assert parse_sampler(comfy).base == ours, comfy
    for comfy in ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "kl_optimal"):
        assert parse_schedule(comfy) == comfy
    assert parse_sampler("k_dpmpp_2m").base == "dpm++2m" and parse_sampler("k_euler_a").base == "euler-a"


@pytest.mark.parametrize("label,name", [("Automatic", "automatic"), ("Uniform", "normal"), ("Normal", "normal"),
                                        ("uniform", "uniform"), ("Model timesteps", "uniform"), ("SGM Uniform",
                                        "sgm_uniform"), ("KL Optimal", "kl_optimal"), ("Align Your Steps",
                                        "align_your_steps"), ("DDIM", "ddim_uniform"), ("Polyexponential",
                                        "polyexponential"), ("Beta", "beta"), ("AYS", "align_your_steps")])
def test_a1111_schedule_labels(label, name):
    """A1111's label "Uniform" is its k-diffusion uniform (get_sigmas), nijimi's normal; nijimi's own name
    ``uniform`` (the model's timesteps) is written "Model timesteps"."""
    assert parse_schedule(label) == name


def test_labels_nijimi_writes_are_a1111s_except_its_own_schedules():
    """Every schedule A1111 has is written with A1111's label, and each label means one schedule; nijimi's own
    (the model's timesteps, trailing, LCM) carry labels A1111 does not know, which it reads as Automatic."""
    written = {name: label for name, label in SCHEDULE_LABELS.items() if name != "automatic"}
    assert len(set(written.values())) == len(written)
    assert {name for name, label in written.items() if label not in A1111_LABELS} == {"uniform", "trailing", "lcm"}
    assert "Uniform" not in written.values() and written["normal"] == "Normal"
    for name, label in written.items():
        assert parse_schedule(label) == name


def test_infotext_round_trips_every_sampler_and_schedule():
    """nijimi writes A1111 ≥ 1.9's ``Sampler: DPM++ 2M, Schedule type: Exponential``, and A1111's old combined name
    where it had one (``Sampler: DPM++ 2M Karras, Schedule type: Karras``, which ComfyUI's importer reads); reading
    it back gives the choice."""
    for base in SAMPLER_SPECS:
        for schedule in SCHEDULE_LABELS:
            choice = parse_sampler(base, schedule)
            settings = generation_settings(steps=20, sampler=choice.infotext_name, schedule=choice.schedule_label,
                                           cfg_scale=7, seed=1, size=(512, 512))
            text = format_parameters("a cat", "", settings)
            assert f"Sampler: {choice.infotext_name}, Schedule type: {choice.schedule_label}, CFG scale" in text
            assert choice_from_infotext(parse_parameters(text)["settings"]) == choice
    assert parse_sampler("dpm++2m", "karras").infotext_name == "DPM++ 2M Karras"
    assert parse_sampler("dpm++3m-sde", "exponential").infotext_name == "DPM++ 3M SDE Exponential"
    assert parse_sampler("euler", "karras").infotext_name == "Euler"
    assert parse_sampler("dpm++2m", "align_your_steps").infotext_name == "DPM++ 2M"


@pytest.mark.parametrize("line,expected", [
    ("Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1", ("dpm++2m", "karras")),
    ("Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1", ("dpm++2m", "karras")),
    ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 7", ("dpm++2m", "exponential")),
    ("Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7", ("euler-a", "normal")),
    ("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1", ("euler-a", "normal")),
    ("Steps: 20, Sampler: Euler, Schedule type: Uniform, CFG scale: 7", ("euler", "normal")),
    ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale: 7", ("dpm++2m", "normal")),
    ("Steps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7", ("euler", "karras")),
    ("Steps: 20, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7", ("ddim", "uniform")),
    ("Steps: 20, Sampler: Euler, Schedule type: Model timesteps, CFG scale: 7", ("euler", "uniform")),
    ("Steps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1", ("dpm++sde", "karras")),
    ("Steps: 20, Sampler: DPM2 a, Schedule type: Align Your Steps, CFG scale: 7", ("dpm2-a", "align_your_steps")),
    ("Steps: 20, Sampler: DPM++ 3M SDE Exponential, CFG scale: 7", ("dpm++3m-sde", "exponential")),
])
def test_a1111_infotexts_old_and_new(line, expected):
    settings = parse_parameters(f"a cat\nNegative prompt: \n{line}")["settings"]
    assert choice_from_infotext(settings) == SamplerChoice(*expected)


def test_bad_names_raise_naming_them():
    with pytest.raises(SamplerError, match="unknown schedule 'cubic'"):
        parse_schedule("cubic")
    with pytest.raises(SamplerError, match=re.escape("unknown sampler 'DPM++ 2M Cubic'; known: ddpm, ddim, euler")):
        parse_sampler("DPM++ 2M Cubic")
    with pytest.raises(SamplerError, match="infotext has no Sampler"):
        choice_from_infotext({"Steps": 20})
    with pytest.raises(SamplerError, match="no sampler 'euler' with schedule 'automatic'"):
        SamplerChoice("euler", "automatic")
