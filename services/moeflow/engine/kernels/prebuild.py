"""Build the C kernels ahead of time.

``python -m moeflow.engine.kernels.prebuild``: compile this machine's native build into
``$MOEFLOW_HOME/kernels`` (what ``make install`` runs, so the first engine start only maps it).
``python -m moeflow.engine.kernels.prebuild --portable DIR``: compile one library per x86-64
level into DIR, for a container image whose runtime has no compiler; point
``$MOEFLOW_KERNELS_PREBUILT`` at DIR there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moeflow.engine.kernels import native


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moeflow.engine.kernels.prebuild", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--portable", type=Path, metavar="DIR", default=None,
                        help="build the portable x86-64 variants into DIR instead of the "
                             "native build (default: native into $MOEFLOW_HOME/kernels)")
    parser.add_argument("--variants", default=",".join(native.VARIANTS),
                        help="portable variants to build, comma-separated "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.portable is not None:
            variants = tuple(v for v in args.variants.split(",") if v)
            unknown = sorted(set(variants) - set(native.VARIANTS))
            if unknown:
                parser.error(f"unknown variant(s) {', '.join(unknown)}; "
                             f"known: {', '.join(native.VARIANTS)}")
            for path in native.build_prebuilt(args.portable, variants):
                sys.stdout.write(f"built {path}\n")
        else:
            kernels = native.load()
            rows = ", ".join(f"{n} rows on {block}-row blocks"
                             for block, n in kernels.packed_linear_rows.items())
            sys.stdout.write(f"C kernels ready ({kernels.variant}, packed products up to "
                             f"{rows})\n")
    except (OSError, RuntimeError) as exc:
        sys.stderr.write(f"error: the C kernels could not be built: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
