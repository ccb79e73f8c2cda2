"""The ANTs peer of the benchmarks: one ``ants.registration`` of a NIfTI pair, in ANTs' own venv.

Runs with the ANTs virtual environment's Python (``.venv-ants/bin/python``: antspyx + nibabel only,
kept apart from ours because antspyx pins its own NumPy), never imported by the project::

    .venv-ants/bin/python benchmarks/ants_register.py --fixed F.nii.gz --moving M.nii.gz \\
        --moving-labels ML.nii.gz --transform SyN --out-labels W.nii.gz --out-json W.json

It registers ``moving`` to ``fixed`` with ``type_of_transform`` = ``SyN`` (affine + SyN on mutual
information, ANTs' default) or ``SyNCC`` (affine + SyN on local cross-correlation), all defaults
otherwise, warps the moving label map (if given) onto the fixed grid with ``genericLabel`` interpolation, and
writes a JSON record: registration wall time and CPU time of all threads (seconds, ``ants.registration``
alone; the CPU time tells how long it needs when the machine is shared), warping time,
and the percentage of fixed-grid voxels where the Jacobian determinant of the deformable part
(``fwdtransforms[0]``) is <= 0 (the affine part has a constant positive determinant). With ``--out-field``
it also writes the whole fixed→moving map (affine and SyN composed by ``antsApplyTransforms``) as one
displacement field on the fixed grid: ITK's convention, a NIfTI vector image whose vectors are physical
LPS millimetres, ``x + u(x)`` being the moving point of the fixed point ``x``. With ``--out-fixed-in-moving``
it writes the fixed image pulled onto the moving image's grid through the inverse transforms (the brain in
atlas space, when the atlas is the moving image).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    """Command-line arguments (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixed", required=True, type=Path, help="fixed image NIfTI")
    parser.add_argument("--moving", required=True, type=Path, help="moving image NIfTI")
    parser.add_argument(
        "--moving-labels", type=Path, help="moving label map NIfTI (warped with --out-labels)"
    )
    parser.add_argument("--fixed-labels", type=Path, help="fixed label map: fold % also inside labels > 0")
    parser.add_argument("--transform", default="SyN", choices=["SyN", "SyNCC"], help="type_of_transform")
    parser.add_argument("--out-labels", type=Path, help="warped label map NIfTI (written)")
    parser.add_argument("--out-json", required=True, type=Path, help="record JSON (written)")
    parser.add_argument("--out-field", type=Path, help="composed displacement field NIfTI (written)")
    parser.add_argument(
        "--out-fixed-in-moving",
        type=Path,
        help="the fixed image warped onto the moving grid (inverse, written)",
    )
    parser.add_argument("--threads", type=int, default=2, help="ITK threads")
    parser.add_argument("--seed", type=int, default=1, help="ANTs random seed")
    return parser.parse_args()


def main() -> None:
    """Register, warp the labels, measure folding and time; write the labels and the JSON record."""
    args = parse_args()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import ants
    import numpy as np

    fixed = ants.image_read(str(args.fixed))
    moving = ants.image_read(str(args.moving))
    workdir = Path(tempfile.mkdtemp(prefix="ants_"))
    try:
        start = time.perf_counter()
        cpu_start = resource.getrusage(resource.RUSAGE_SELF)
        reg = ants.registration(
            fixed,
            moving,
            type_of_transform=args.transform,
            outprefix=str(workdir / "reg_"),
            random_seed=args.seed,
        )
        reg_seconds = time.perf_counter() - start
        cpu_end = resource.getrusage(resource.RUSAGE_SELF)
        reg_cpu_seconds = (cpu_end.ru_utime + cpu_end.ru_stime) - (cpu_start.ru_utime + cpu_start.ru_stime)
        start = time.perf_counter()
        warped = None
        if args.moving_labels is not None:
            warped = ants.apply_transforms(
                fixed,
                ants.image_read(str(args.moving_labels)),
                transformlist=reg["fwdtransforms"],
                interpolator="genericLabel",
            )
        warp_seconds = time.perf_counter() - start
        jac = ants.create_jacobian_determinant_image(fixed, reg["fwdtransforms"][0], do_log=False).numpy()
        if args.out_field is not None:
            composed = ants.apply_transforms(
                fixed, moving, transformlist=reg["fwdtransforms"], compose=str(workdir / "composed_")
            )
            args.out_field.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(composed, args.out_field)
        if args.out_fixed_in_moving is not None:
            inverse = ants.apply_transforms(
                moving, fixed, transformlist=reg["invtransforms"], whichtoinvert=[True, False]
            )
            args.out_fixed_in_moving.parent.mkdir(parents=True, exist_ok=True)
            ants.image_write(inverse, str(args.out_fixed_in_moving))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if warped is not None and args.out_labels is not None:
        args.out_labels.parent.mkdir(parents=True, exist_ok=True)
        ants.image_write(warped, str(args.out_labels))
    record = {
        "method": f"ANTs {args.transform}",
        "ants_version": ants.__version__,
        "fixed": str(args.fixed),
        "moving": str(args.moving),
        "out_labels": None if args.out_labels is None else str(args.out_labels),
        "register_seconds": reg_seconds,
        "register_cpu_seconds": reg_cpu_seconds,
        "warp_seconds": warp_seconds,
        "threads": args.threads,
        "folding_percent": float(100.0 * np.mean(jac <= 0)),
    }
    if args.fixed_labels is not None:
        mask = ants.image_read(str(args.fixed_labels)).numpy() > 0
        record["folding_percent_in_brain"] = float(100.0 * np.mean(jac[mask] <= 0))
    args.out_json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
