"""Helpers shared by the tests (importable because pytest puts ``tests/`` on the path, see pyproject): named small
configs, random weights, ``rel_err``, gloo process groups, racing processes, a file's resident pages. Fixtures live in
``conftest.py`` files.

One RNG policy: every random tensor drawn here comes from an explicit ``torch.Generator`` seeded by the caller (module
inits, which take no generator, run under a forked, seeded global RNG); the global RNG is never left changed."""

import dataclasses
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig
from nijimi.models.vae import VAEConfig

# Small models of the real SD 1.x and SD 2.x architectures (SD2: linear projections, 64-wide heads, GELU text
# encoder used at its penultimate layer, OpenCLIP projection), for checkpoint layout tests.
SD1 = ModelConfig(
    UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=8,
               context_dim=64),
    VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1),
    TextEncoderConfig(width=64, num_layers=2, num_heads=1, mlp_width=128), "sd1", 49407)
SD2 = ModelConfig(
    UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=None,
               head_dim=64, context_dim=128, linear_proj=True, upcast_attention=True),
    VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1),
    TextEncoderConfig(width=128, num_layers=3, num_heads=2, mlp_width=256, activation="gelu", clip_skip=2,
                      projection_dim=96), "sd2", 0)

# U-Nets of the real block structure (4 levels, 2 res blocks) with fewer channels, for parity with diffusers: SD 1.x
# (fixed head count), SD 2.x (per-level head counts from a fixed head width, linear projections) and the tiny preset.
PARITY_UNET_SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                             attention_levels=(0, 1, 2), num_heads=4, context_dim=32, norm_groups=16)
PARITY_UNET_SD2 = dataclasses.replace(PARITY_UNET_SD1, num_heads=None, head_dim=8, context_dim=48, linear_proj=True,
                                      upcast_attention=True)
PARITY_UNET_TINY = dataclasses.replace(UNetConfig.tiny(), model_channels=32, norm_groups=16, context_dim=40)

# The adapter tests' models: an SD 1.x-style U-Net with attention at both levels, 1×1 proj_in/out, ResBlock skips,
# down/up sampling; the same with SD 2.x's linear projections; a 1000-token text encoder.
UNET_SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                        num_heads=2, context_dim=24, norm_groups=8)
UNET_SMALL_LINEAR = dataclasses.replace(UNET_SMALL, num_heads=None, head_dim=16, linear_proj=True)
TEXT_SMALL = TextEncoderConfig(vocab_size=1000, width=24, num_layers=2, num_heads=2, mlp_width=48)
MODEL_SMALL = ModelConfig(UNET_SMALL, VAEConfig.tiny(), TEXT_SMALL, "sd1", pad_token_id=999)

# Toy SD 1.x models for tests that generate or train, named by their VAE factor; each U-Net sees 8×8 latents.
# TOY_F8: 64×64 images through SD's own 4-level (factor 8) VAE, so diffusers' ``vae_scale_factor`` agrees.
TOY_F8 = ModelConfig(
    UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
               context_dim=32, sample_size=8),
    VAEConfig(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1),
    TextEncoderConfig(width=32, num_layers=2, num_heads=2, mlp_width=64), "sd1", 49407)
# TOY_F2: 16×16 images through a factor-2 VAE; a few training steps take a fraction of a second.
TOY_F2 = dataclasses.replace(TOY_F8, vae=VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1))
# TOY_F4: 32×32 images through a factor-4 VAE like the embedded model's (a 3-level ControlNet hint encoder); the
# narrowest: 16 channels, 8 norm groups, one text layer.
TOY_F4 = ModelConfig(
    UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
               context_dim=32, sample_size=8, norm_groups=8),
    VAEConfig(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
    TextEncoderConfig(width=32, num_layers=1, num_heads=2, mlp_width=64), "sd1", 49407)


def randomize(model: torch.nn.Module, seed: int, embedding_std: float | None = None) -> None:
    """Fill every parameter with seeded noise so nothing is zero (zero convs included): weights ~ 1/√fan_in, norm
    gains ~ 1, biases ~ 0.1, and parameters named ``*embedding*`` ~ ``embedding_std`` when it is given."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if embedding_std is not None and "embedding" in name:
                p.copy_(embedding_std * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Add N(0, std²) noise drawn from ``torch.Generator().manual_seed(seed)`` to every parameter, so zero-initialised
    layers are not zero (and a fresh text encoder's final LayerNorm does not give hidden states of mean exactly 0);
    returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
    return module


def random_model(config: ModelConfig, seed: int) -> LatentDiffusion:
    """The same LatentDiffusion for the same seed, in eval mode, the global RNG untouched: the init (``nn.Module``
    init draws from the global RNG and takes no generator) runs under ``fork_rng`` seeded with ``seed``, then
    :func:`perturb` adds N(0, 0.05²) from an explicit generator."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LatentDiffusion(config)
    return perturb(model, seed).eval()


def resident_kib(path: os.PathLike) -> int:
    """KiB of ``path``'s memory maps resident in this process (the ``Rss`` of its mappings in /proc/self/smaps);
    skips the test where there is no /proc (not Linux)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file():
        pytest.skip("needs /proc/self/smaps (Linux)")
    target, inside, total = os.path.realpath(path), False, 0
    for line in smaps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header: address range ... [path]
            inside = len(fields) == 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute error relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


def output_errors(model: LatentDiffusion, unet, vae, text, seed: int = 0) -> dict[str, float]:
    """:func:`rel_err` of nijimi's U-Net, VAE decoder and encoder, and text encoder against diffusers' /
    transformers' ``unet``, ``vae`` and ``text`` on the same seeded inputs."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    context = torch.randn(2, 5, cfg.unet.context_dim, generator=g)
    image = torch.randn(1, 3, 16, 16, generator=g)
    ids = torch.randint(0, cfg.text.vocab_size, (2, 7), generator=g)
    with torch.no_grad():
        return {
            "unet": rel_err(model.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample),
            "vae.decode": rel_err(model.vae.decode(x[:1, :4]), vae.decode(x[:1, :4]).sample),
            "vae.encode": rel_err(model.vae.encode(image).mean, vae.encode(image).latent_dist.mean),
            "text": rel_err(model.text_encoder(ids), text(ids).last_hidden_state),
        }


def _gloo_rank(rank: int, world: int, store: Path, work: Callable, args: tuple) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        work(rank, *args)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    # Leave without running C++ static destructors: after gloo's teardown one of them intermittently calls
    # std::terminate at interpreter exit (SIGABRT, "terminate called without an active exception", ~1 run in 8 on
    # 2 cores), when the work is already done. An exception above still fails the caller through spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo_ranks(work: Callable, world: int, tmp_path: Path, *args) -> None:
    """Run ``work(rank, *args)`` in ``world`` spawned processes joined in one gloo process group (a file-store
    rendezvous under ``tmp_path``: no port to pick); ``work`` must be a module-level function."""
    torch.multiprocessing.spawn(_gloo_rank, args=(world, tmp_path / "gloo-store", work, args), nprocs=world,
                                join=True)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``nijimi ARGV`` in-process (``nijimi.cli.main``): (exit code, stdout, stderr)."""
    from nijimi.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def png_pixels(path: Path) -> np.ndarray:
    """An image file's RGB pixels as an int array (H, W, 3)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def save_rotated(path: Path, upright: np.ndarray) -> Path:
    """Save RGB ``upright`` turned a quarter left, tagged EXIF Orientation 6 (display turned 90° clockwise): a viewer
    honouring the tag shows ``upright`` again, one ignoring it shows the turned pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    return path


def _report(target: Callable, i: int, barrier, results) -> None:
    try:
        results.put((i, target(i, barrier)))
    except Exception as e:  # handed to the test, which checks it
        results.put((i, e))


def in_processes(target: Callable, count: int) -> list:
    """Run ``target(i, barrier)`` in ``count`` forked processes at once and return what each returned or raised, in
    order of ``i``. ``barrier`` (a ``multiprocessing.Barrier`` of all of them, 60 s timeout) lines up the step that
    races, so a test of concurrent writers is deterministic without timing."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(count, timeout=60), ctx.Queue()
    processes = [ctx.Process(target=_report, args=(target, i, barrier, results)) for i in range(count)]
    for process in processes:
        process.start()
    got = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    return [got[i] for i in range(count)]


def without_hanging(call: Callable[[], object], fifo: Path) -> BaseException | None:
    """What ``call`` raised (None if nothing), run in a thread; if it is still blocked after 20 s (it opened the FIFO
    ``fifo``), a writer unblocks it and the test fails."""
    outcome = {}

    def target():
        try:
            call()
        except Exception as e:  # noqa: BLE001 - the test inspects what was raised
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer lets the blocked open return
        pytest.fail(f"{call} blocked on the FIFO {fifo}")
    return outcome.get("error")
