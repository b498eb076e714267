"""Expert-sized blocks read with O_DIRECT as a safetensors checkpoint lays them out and as a packed store
does, on one test file, alternately, cold; the medians of ``--rounds`` passes each (the measurement of
``klotski-tier bench``'s layouts line, at several block sizes and more rounds).

    PYTHONPATH=. python benchmarks/layout_reads.py --path /work/benchtmp --mib 5.25 12 22
"""

from __future__ import annotations

import argparse
from pathlib import Path

from klotski_tier.core.bench import drive
from klotski_tier.core.units import GIB, MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, required=True, help="a directory on the drive to measure")
    parser.add_argument("--mib", type=float, nargs="+", default=[5.25, 12.0, 22.0], help="block sizes")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--queue-depth", type=int, default=4)
    parser.add_argument("--file-gib", type=float, default=1.0)
    args = parser.parse_args()
    path = args.path / drive.TEST_FILE_NAME
    drive.write_test_file(path, int(args.file_gib * GIB) // 4096 * 4096)
    try:
        print("block      checkpoint GB/s  packed GB/s  checkpoint / packed")
        for mib in args.mib:
            result = drive.measure_layout_reads(
                path, int(mib * MIB), args.queue_depth, args.rounds, lambda m: None
            )
            assert result is not None, "the test file is too small for these blocks"
            checkpoint, packed = result.checkpoint_gbps, result.packed_gbps
            print(f"{mib:6.2f} MiB  {checkpoint:15.2f}  {packed:11.2f}  {result.ratio:19.2f}")
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
