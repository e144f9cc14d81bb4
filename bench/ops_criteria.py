"""Acceptance criteria of the fused ops, evaluated on the records of :func:`noprop.bench.ops.measure`.

* CPU: the ``extension`` backend's CPU build at least :data:`CPU_SPEEDUP_MIN` times faster than the
  reference on forward + backward of ``noised_latents`` + ``denoising_loss`` (sum of the four
  medians) at T=10, B=128, C=10, D=784, once with the DT and once with the FM loss.
* CUDA, per fused backend and judged (op case, pass) (``stacked_linear`` is measured, not judged): at least :data:`GPU_SPEEDUP_MIN` times faster than
  the reference on every T=10, B=128 shape (the worst one is reported), and at most
  :data:`GPU_FLOOR_RATIO_MAX` times the bandwidth floor at B=65536.

Each criterion is ``{name, measured, threshold, comparison, passed, detail}``; ``passed`` is None
when the measurement it needs was not made (backend unavailable, shape not run).
"""

from __future__ import annotations

from bench import op_cases
from bench.op_cases import CASE_PASSES, LARGE_BATCH, PAPER_BATCH
from noprop import backends

CPU_SPEEDUP_MIN = 3.0
GPU_SPEEDUP_MIN = 5.0
GPU_FLOOR_RATIO_MAX = 1.5


def _criterion(name: str, measured: float | None, threshold: float, comparison: str, detail: str) -> dict:
    if measured is None:
        passed = None
    else:
        passed = measured >= threshold if comparison == ">=" else measured <= threshold
    return dict(name=name, measured=measured, threshold=threshold, comparison=comparison, passed=passed, detail=detail)


def _find(records: list[dict], **match) -> list[dict]:
    return [r for r in records if all(r[key] == value for key, value in match.items())]


def cpu_criteria(records: list[dict], skipped: dict[str, str]) -> list[dict]:
    """The ``extension`` backend's CPU build vs the reference, fwd + bwd of noised_latents + denoising_loss."""
    shape = op_cases.shapes_named([op_cases.CPU_CRITERION_SHAPE])[0]
    out = []
    for config in ("DT", "FM"):
        parts = [(case, pass_) for case in ("noised_latents", f"denoising_loss[{config}]") for pass_ in op_cases.PASSES]
        totals = {}
        for backend in ("reference", "extension"):
            found = [_find(records, case=c, shape=shape.name, backend=backend, **{"pass": p}) for c, p in parts]
            totals[backend] = sum(f[0]["median_ms"] for f in found) if all(found) else None
        if None in totals.values():
            measured = None
            detail = f"not measured ({skipped.get('extension') or f'shape {shape.name} not run'})"
        else:
            measured = totals["reference"] / totals["extension"]
            detail = (
                f"sum of 4 medians at {shape.dims}: reference {totals['reference']:.4g} ms, "
                f"extension {totals['extension']:.4g} ms"
            )
        name = f"cpu: extension >= {CPU_SPEEDUP_MIN:g}x reference, fwd+bwd noised_latents + denoising_loss[{config}]"
        out.append(_criterion(name, measured, CPU_SPEEDUP_MIN, ">=", detail))
    return out


def gpu_criteria(records: list[dict], skipped: dict[str, str]) -> list[dict]:
    """Per fused backend and (op case, pass): worst speedup at T=10, B=128, and measured / floor at B=65536."""
    out = []
    for backend in backends.AUTO_ORDER:
        missing = f"not measured ({skipped.get(backend) or 'shape not run'})"
        for case, pass_ in CASE_PASSES:
            if not case.judged or op_cases.lacks(backend, case):
                continue
            mine = _find(records, backend=backend, case=case.name, **{"pass": pass_})
            small = [r for r in mine if r["T"] == 10 and r["B"] == PAPER_BATCH and r["speedup"] is not None]
            worst = min(small, key=lambda r: r["speedup"]) if small else None
            out.append(_criterion(
                f"gpu: {backend} {case.name} {pass_} >= {GPU_SPEEDUP_MIN:g}x reference at T=10 B={PAPER_BATCH}",
                worst["speedup"] if worst else None, GPU_SPEEDUP_MIN, ">=",
                f"worst shape {worst['shape']}: {worst['median_ms']:.4g} ms" if worst else missing,
            ))
            large = [r for r in mine if r["B"] == LARGE_BATCH and r["floor_ratio"] is not None]
            out.append(_criterion(
                f"gpu: {backend} {case.name} {pass_} <= {GPU_FLOOR_RATIO_MAX:g}x bandwidth floor at B={LARGE_BATCH}",
                large[0]["floor_ratio"] if large else None, GPU_FLOOR_RATIO_MAX, "<=",
                f"{large[0]['median_ms']:.4g} ms, floor {large[0]['floor_ms']:.4g} ms ({large[0]['bytes']} bytes)"
                if large else missing,
            ))
    return out
