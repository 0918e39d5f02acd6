"""Devices, dtypes and the memory rules for VAE tiles and attention slices (nijimi/pipelines/runtime.py)."""

from __future__ import annotations

import os

import pytest
import torch

from nijimi.errors import ConfigError
from nijimi.models.ldm import ModelConfig
from nijimi.models.unet import UNetConfig
from nijimi.models.vae import VAEConfig
from nijimi.pipelines import runtime
from nijimi.pipelines.runtime import (
    attention_slice_for,
    check_generation_memory,
    choose_attention_slice,
    choose_vae_tile,
    cpu_info,
    default_threads,
    dtype_name,
    generation_memory,
    resolve_device,
    time_bf16,
    vae_tile_for,
)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="meta is not supported"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


def test_dtype_names():
    assert dtype_name(torch.float32) == "fp32" and dtype_name(torch.bfloat16) == "bf16"
    assert runtime.WEIGHT_DTYPES["bf16"] is torch.bfloat16
    with pytest.raises(ConfigError, match="float16"):
        dtype_name(torch.float16)


def test_vae_tile_for():
    """SD's VAE (512 channels at full width) at 1024×1024, batch 1: 6·512·1024²·4 B = 12 GiB of activations."""
    need = 6 * 512 * 1024 * 1024 * 4
    assert vae_tile_for(1024, 1024, 512, 1, memory=4 * need) is None
    assert vae_tile_for(1024, 1024, 512, 1, memory=4 * need - 4) == 512


def test_attention_slice_for():
    """SD 1.5 at 512×512: 4096 tokens at level 0, 8 heads, 2 rows (guidance) → 4096·4096·8·2·4 B = 1 GiB of scores."""
    full = 4096 * 4096 * 8 * 2 * 4
    assert attention_slice_for(4096, 8, 2, memory=4 * full) is None
    assert attention_slice_for(4096, 8, 2, memory=full) == 1024  # a quarter of the scores fits: 1024 query rows
    assert attention_slice_for(4096, 8, 2, memory=16) == 1  # never below one row


def test_choose_vae_tile():
    cfg = VAEConfig()
    assert choose_vae_tile(0, cfg, 512, 512, 1) is None
    assert choose_vae_tile(256, cfg, 512, 512, 1) == 256
    for bad in (-8, 12, 1.5, True):
        with pytest.raises(ConfigError, match="VAE tile"):
            choose_vae_tile(bad, cfg, 512, 512, 1)


def test_choose_attention_slice(monkeypatch):
    cfg = UNetConfig.sd15()
    assert choose_attention_slice(0, cfg, (64, 64), 2) is None
    assert choose_attention_slice(7, cfg, (64, 64), 2) == 7
    monkeypatch.setattr(runtime, "available_memory", lambda: 4096 * 4096 * 8 * 2 * 4)
    assert choose_attention_slice(None, cfg, (64, 64), 2) == 1024  # level 0: 64·64 tokens, 8 heads
    sd21 = UNetConfig.sd21()  # head_dim 64: 5 heads over 320 channels
    assert choose_attention_slice(None, sd21, (64, 64), 2) == 1638  # (1 GiB / 4) // (2 rows · 5 · 4096 · 4 B)
    no_attention = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=())
    assert choose_attention_slice(None, no_attention, (64, 64), 2) is None
    with pytest.raises(ConfigError, match="attention slice"):
        choose_attention_slice(-1, cfg, (64, 64), 2)


CPUINFO = """processor\t: 0
physical id\t: 0
core id\t\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse avx2 avx512f amx_tile

processor\t: 1
physical id\t: 0
core id\t\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse avx2 avx512f amx_tile

processor\t: 2
physical id\t: 0
core id\t\t: 1
model name\t: Test CPU 9000
flags\t\t: fpu sse avx2 avx512f amx_tile
"""


def test_cpu_info_reads_features_and_physical_cores():
    """Two hyper-threads on core 0 and one on core 1: 2 physical cores, 3 logical CPUs."""
    cpu = cpu_info(CPUINFO)
    assert cpu.model == "Test CPU 9000" and (cpu.physical_cores, cpu.logical_cpus) == (2, 3)
    assert cpu.features == {"AVX2": True, "AVX-512": True, "AVX-512 BF16": False, "AMX BF16": False,
                            "AMX tile": True}


def test_cpu_info_without_cpuinfo_is_unknown():
    cpu = cpu_info("")
    assert cpu.model == "unknown" and cpu.features is None
    assert cpu.physical_cores == cpu.logical_cpus == (os.cpu_count() or 1)


def test_default_threads():
    assert default_threads({}, 4) == 4
    assert default_threads({"OMP_NUM_THREADS": "1"}, 4) is None
    assert default_threads({"OMP_NUM_THREADS": "1", "NIJIMI_THREADS": "3"}, 4) == 3
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(ConfigError, match=f"NIJIMI_THREADS='{bad}' must be a positive integer"):
            default_threads({"NIJIMI_THREADS": bad}, 4)


def test_time_bf16_times_matmul_and_conv():
    timings = time_bf16(size=32, repeats=1)
    assert [t.op for t in timings] == ["matmul", "conv2d"]
    assert all(t.fp32 > 0 and t.bf16 > 0 for t in timings)


def test_generation_memory_grows_with_size_and_batch_and_refuses_naming_both():
    """SD1.5 at 512² (guided: 2 U-Net rows) needs well under 2 GiB by the estimate; a batch of 4 about four times as
    much; --size 99992x99992 is refused before anything is allocated, naming --size, --batch and both amounts."""
    cfg = ModelConfig.preset("sd15")
    one = generation_memory(cfg.unet, cfg.vae, 512, 512, 1, 2)
    assert 0.5 * 2**30 < one < 2 * 2**30
    assert 3.5 * one < generation_memory(cfg.unet, cfg.vae, 512, 512, 4, 8) < 4.5 * one
    check_generation_memory(cfg.unet, cfg.vae, 512, 512, 1, 2, memory=16 << 30)
    with pytest.raises(ConfigError, match=r"^--size 99992x99992 with --batch 1 needs about \d+\.\d GiB for this model "
                                          r"\(latents, U-Net activations, decoded pixels\); 16\.0 GiB of memory is "
                                          r"available$"):
        check_generation_memory(cfg.unet, cfg.vae, 99992, 99992, 1, 2, memory=16 << 30)
