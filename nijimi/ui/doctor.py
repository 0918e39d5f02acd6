"""``nijimi doctor``: what this machine offers nijimi (the CPU's features, cores and threads, torch) and a measured
answer to whether ``--dtype bf16`` is faster here than fp32 (:func:`~nijimi.pipelines.runtime.time_bf16`)."""

from __future__ import annotations

import argparse

import torch

from nijimi.pipelines.runtime import CPU_FEATURES, THREADS_ENV, cpu_info, time_bf16

FASTER = 1.1
"""bf16 counts as faster when fp32 takes this many times as long."""


def add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``nijimi doctor``."""
    p = sub.add_parser("doctor", help="the CPU's features, threads, and whether --dtype bf16 is faster here")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print one ``label: value`` line per fact, then the bf16 timings and a verdict."""
    cpu = cpu_info()
    print(f"CPU: {cpu.model}")
    for label in CPU_FEATURES:
        print(f"{label}: {'unknown' if cpu.features is None else 'yes' if cpu.features[label] else 'no'}")
    print(f"physical cores: {cpu.physical_cores}")
    print(f"logical CPUs: {cpu.logical_cpus}")
    print(f"torch threads: {torch.get_num_threads()} (set {THREADS_ENV}=N to change)")
    print(f"torch: {torch.__version__}")
    timings = time_bf16()
    for t in timings:
        print(f"{t.op} fp32/bf16 time: {t.fp32 * 1e3:.2f} ms / {t.bf16 * 1e3:.2f} ms ({t.fp32 / t.bf16:.2f}×)")
    ratio = sum(t.fp32 for t in timings) / sum(t.bf16 for t in timings)
    verdict = "yes, use --dtype bf16" if ratio >= FASTER else "no, keep fp32 (the default)"
    print(f"bf16 faster here: {verdict} (bf16 speed-up {ratio:.2f}×)")
    return 0
