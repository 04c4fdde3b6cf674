"""Convert an authors' released checkpoint to ovseg's weight files (safetensors + config).

    python tools/convert_checkpoint.py --list
    python tools/convert_checkpoint.py --format ovseg ovseg_R101c_vitB16_ft_mpt.pth \\
        weights/ovseg_r101c.safetensors
    python tools/convert_checkpoint.py --format dino dino_deitsmall8_pretrain.pth \\
        weights/dino_vits8.safetensors --arch vit_small_patch8_224.dino

The formats and their key maps are :data:`ovseg.modeling.convert.FORMATS`. Every tensor of the
file must find its home and every weight of the network must be there, with its shape; the
table of keys and shapes is printed (``--quiet``: only the summary). Beside OUTPUT go any further
part (``OUTPUT-stem.clip.safetensors``...) and ``OUTPUT-stem.yaml``: the config keys that load
them, also printed as ``KEY VALUE`` overrides for ``tools/train_net.py`` and ``demo/demo.py``.

Exit status: 0 done; 2 a mistake (unknown format or arch, an unreadable file, a file that does
not fit), reported as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ovseg.errors import OvsegError
from ovseg.modeling.convert import FORMATS, convert_checkpoint

EXIT_OK = 0
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert an authors' released checkpoint to ovseg's safetensors + config.",
        epilog="Formats: " + ", ".join(FORMATS) + " (--list describes them)",
    )
    parser.add_argument("--format", choices=sorted(FORMATS), metavar="NAME",
                        help="the file's format: " + ", ".join(FORMATS))
    parser.add_argument("--arch", default=None,
                        help="the architecture (default: the one the file fits)")
    parser.add_argument("--list", action="store_true", help="describe the formats and exit")
    parser.add_argument("--quiet", action="store_true",
                        help="print the summary without the table of keys and shapes")
    parser.add_argument("input", nargs="?", help="the authors' checkpoint")
    parser.add_argument("output", nargs="?", help="the .safetensors file to write")
    return parser


def describe_formats() -> str:
    lines = []
    for fmt in FORMATS.values():
        archs = ", ".join(fmt.archs) or "set by the file"
        if fmt.test_archs:
            archs += f" (tests: {', '.join(fmt.test_archs)})"
        lines += [f"{fmt.name}", f"    reads: {fmt.files}", f"    archs: {archs}",
                  f"    loads as: {fmt.loads_into}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(describe_formats())
        return EXIT_OK
    if not (args.format and args.input and args.output):
        parser.error("--format NAME INPUT OUTPUT are required (or --list)")
    try:
        conversion = convert_checkpoint(args.format, args.input, args.output, args.arch)
    except OvsegError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    report = conversion.report()
    if args.quiet:
        report = "\n".join(line for line in report.splitlines() if not line.startswith("  "))
    print(report)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
