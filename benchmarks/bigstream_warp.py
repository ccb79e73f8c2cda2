"""bigstream's ``distributed_apply_transform``, as its users call it, for ``benchmarks/warp_throughput.py``.

Runs in bigstream's own environment (``python -m venv .venv-bigstream && .venv-bigstream/bin/pip install
bigstream 'zarr<3'``: bigstream 5.0.3 imports ``zarr.blosc``, which Zarr 3 removed), so it imports nothing of
PatchMorph. The moving image is a plain Zarr v2 array; the displacement field a ``.npy`` of shape
``(Z, Y, X, 3)``: components along the array axes, in the unit of the spacings, fixed → moving (bigstream's
convention, and PatchMorph's for an axis-aligned grid whose first voxel is the field's first voxel: bigstream
places both at its origin 0). The output goes onto the moving image's own grid, through bigstream's local Dask
cluster (``ClusterWrap.local_cluster``) of ``--workers`` single-threaded workers (one ITK thread each).

Usage::

    .venv-bigstream/bin/python benchmarks/bigstream_warp.py MOVING.zarr FIELD.npy OUT.zarr \\
        --spacing 15 12 12 --field-spacing 60 48 48 --blocksize 256 --overlap 0.5 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import zarr


def main() -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("moving", help="moving image: a plain Zarr array (Z, Y, X)")
    parser.add_argument("field", help="displacement (Z, Y, X, 3) .npy, fixed -> moving, in the spacings' unit")
    parser.add_argument("out", help="output Zarr array")
    parser.add_argument("--spacing", type=float, nargs=3, required=True, help="image voxel (z, y, x)")
    parser.add_argument("--field-spacing", type=float, nargs=3, required=True, help="field voxel (z, y, x)")
    parser.add_argument("--blocksize", type=int, default=256, help="block edge in voxels")
    parser.add_argument("--overlap", type=float, default=0.5, help="block overlap as a fraction of the block")
    parser.add_argument("--workers", type=int, default=2, help="local Dask workers (one thread each)")
    args = parser.parse_args()
    os.environ["ITK_THREADS"] = "1"  # inherited by the workers: one thread each, as the Dask threads
    from bigstream.piecewise_transform import distributed_apply_transform

    moving = zarr.open_array(args.moving, mode="r")
    field = np.load(args.field, mmap_mode="r")
    spacing = np.asarray(args.spacing)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out))) as scratch:
        distributed_apply_transform(
            moving, moving, spacing, spacing, [field], (args.blocksize,) * 3,
            write_path=args.out, overlap=args.overlap, temporary_directory=scratch,
            transform_spacing=np.asarray(args.field_spacing),
            cluster_kwargs={
                "cluster_type": "local_cluster", "n_workers": args.workers, "threads_per_worker": 1,
                "host": "127.0.0.1",
                "dashboard_address": None, "memory_limit": "4GiB",
            },
        )  # fmt: skip


if __name__ == "__main__":
    main()
