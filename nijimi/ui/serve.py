"""``nijimi serve``: run the HTTP server (:mod:`nijimi.server`) in the foreground until Ctrl+C; requests are logged
to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nijimi.embedded import ADAPTERS, EMBEDDED
from nijimi.errors import NijimiError
from nijimi.pipelines.runtime import WEIGHT_DTYPES


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``nijimi serve``."""
    p = sub.add_parser("serve", help="HTTP server with A1111's API (/sdapi/v1/…), a job queue, live progress "
                       "and a web page at /")
    p.add_argument("--model", default=EMBEDDED, help="the model loaded first: a name in --models-dir, a checkpoint "
                   "file or diffusers folder, or embedded (default)")
    p.add_argument("--models-dir", type=Path, metavar="DIR",
                   help="folder of checkpoints clients may choose from (sd-models)")
    p.add_argument("--lora-dir", type=Path, default=ADAPTERS, metavar="DIR",
                   help="folder of LoRAs for <lora:NAME:W> tags (default: the embedded model's demo adapters)")
    p.add_argument("--controlnet-dir", type=Path, metavar="DIR",
                   help="folder of ControlNets for the API's ControlNet units (/controlnet/model_list; the embedded "
                   "model's own is listed while it is resident)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), metavar="DIR",
                   help="where images are saved when a request asks (save_images), served under /outputs/")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's; 0: any free port)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=tuple(WEIGHT_DTYPES), default="fp32", help="U-Net and text-encoder weights")
    p.add_argument("--quiet", action="store_true", help="do not log requests")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, listen, print the address, serve until interrupted, then stop the worker cleanly."""
    # imported here: the server reuses the PNG writing of nijimi.cli, which imports this module
    from nijimi.server.app import ServeOptions, Studio
    from nijimi.server.folders import Folders
    from nijimi.server.http import StudioServer

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    folders = Folders(models=args.models_dir, loras=args.lora_dir, output=args.output_dir,
                      controlnets=args.controlnet_dir)
    studio = Studio(ServeOptions(args.model, folders, device=args.device, dtype=WEIGHT_DTYPES[args.dtype]))
    try:
        server = StudioServer(studio, args.host, args.port)  # before the model loads: a taken port fails at once
    except OSError as exc:
        raise NijimiError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    studio.start()
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"nijimi serve: http://{shown}:{port}/ (model {studio.models.selected.name}; A1111 API under /sdapi/v1/); "
          "Ctrl+C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        studio.stop()
    return 0
