"""The 3D demo: predict a ScanNet scene's vertices with CLIP2Scene and write a coloured PLY.

    python demo/demo3d.py --config-file configs/clip2scene/scannet_20.yaml \\
        --scene datasets/scannet/scans/scene0011_00 --output out/ model.weights STUDENT

Writes ``<output>/<scene_id>_pred.ply``: the mesh vertices (no faces), each coloured by its
predicted class (``ovseg.vis.palette`` of the ScanNet-20 names) and with the ushort property
``label`` (the ScanNet-20 index), atomically (a temporary file renamed into place), and prints
its path. Nothing is written, and no output folder created, when the scene, the config or the
weights cannot be read. The library's progress lines ("building the text classifier ...") go to
stderr.

Exit status: 0 done; 2 a mistake (config, scene files, weights), reported as one ``error:``
line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import ovseg
from ovseg.console import library_log_lines
from ovseg.data.scannet import read_scene, write_ply_vertices
from ovseg.errors import ConfigError, OvsegError
from ovseg.vis import palette

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demo3d.py",
        description="Zero-shot 3D segmentation of a ScanNet scene with CLIP2Scene: writes a "
        "PLY of the vertices coloured by predicted class.",
        epilog="Config overrides go last, as KEY VALUE pairs (model.weights FILE).",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config YAML")
    parser.add_argument("--scene", required=True, metavar="DIR",
                        help="a scene folder holding <scene_id>_vh_clean_2.ply")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--device", default="", help="cpu, cuda, ... (default: the config's)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides")
    return parser


def run(args: argparse.Namespace) -> Path:
    opts = [o for o in args.opts if o != "--opts"]
    if args.device:
        opts += ["model.device", args.device]
    cfg = ovseg.get_config(args.config_file, opts)
    if cfg.model.name != "clip2scene":
        raise ConfigError(f"demo3d.py runs clip2scene configs; {args.config_file} has "
                          f"model.name {cfg.model.name!r}")
    output_dir = Path(args.output).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output {output_dir} is a file; give a folder (created if needed)")
    scene_dir = Path(args.scene).expanduser()
    scene = read_scene(scene_dir.parent, scene_dir.name, frames=None, labels=False)
    model = ovseg.build_model(cfg)
    model.eval()
    labels = model.predict_scene(scene)
    colors = palette(model.class_names)[labels]
    path = output_dir / f"{scene.scene_id}_pred.ply"
    return write_ply_vertices(path, scene.points, colors, labels)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with library_log_lines():
            path = run(args)
    except OvsegError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # writing the PLY: a read-only folder, ...
        print(f"error: cannot write into {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
