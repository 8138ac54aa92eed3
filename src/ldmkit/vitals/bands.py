"""The guide's good and bad ranges of each vital sign, for plots.

Bad ranges come from the same thresholds the rules use (``rules.THRESHOLDS``, overridable in
``vitals.thresholds``); good ranges from the guide's "Target / Good Trend" column
(``GOOD``). Sample-space ranges are converted to the run's latent scale as the rules do.
"""

from __future__ import annotations

from dataclasses import dataclass

from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Context

# metric -> (low, high, guide's words), ranges in the metric's own units (None: open end)
GOOD: dict[str, tuple[float | None, float | None, str]] = {
    vm.LOSS: (0.1, 0.4, "loss: 'should steadily decrease to 0.1 - 0.4'"),
    vm.GRAD_NORM: (0.1, 10.0, "grad_norm: 'stable, non-zero (e.g., 0.1 to 10.0)'"),
    vm.COS_EPS: (0.5, 1.0, "cos_eps_mean: 'should climb to > 0.5'"),
}


@dataclass(frozen=True)
class Band:
    kind: str  # "good" or "bad"
    low: float | None
    high: float | None


def bands(metric: str, ctx: Context) -> list[Band]:
    """Good and bad ranges of ``metric`` under ``ctx``'s thresholds and latent scale."""
    thr = ctx.thr
    unit = ctx.guide_unit(metric)  # the guide's loss ranges are eps-prediction's
    out = [Band("good", *(None if v is None else v * unit for v in (lo, hi)))
           for m, (lo, hi, _) in GOOD.items() if m == metric]
    scale = ctx.latent_scale_factor
    if metric == vm.LOSS:
        out += [Band("bad", thr("loss_stuck_high") * unit, None),
                Band("bad", None, thr("loss_too_low") * unit)]
    elif metric == vm.GRAD_NORM:
        out += [Band("bad", thr("grad_norm_high"), None), Band("bad", None, thr("grad_norm_low"))]
    elif metric == vm.VAL_LOSS:
        out += [Band("bad", thr("val_stuck_high") * unit, None)]
    elif metric == vm.COPY_SHARE:
        out += [Band("bad", thr("copy_share_high"), None)]
    elif metric == vm.UPDATE_RATIO:
        out += [Band("bad", None, thr("update_ratio_low"))]
    elif metric == vm.T_MEAN:
        warn, crit = thr("t_mean_dev_warning"), thr("t_mean_dev_critical")
        out += [Band("good", 0.5 - warn, 0.5 + warn), Band("bad", None, 0.5 - crit),
                Band("bad", 0.5 + crit, None)]
    elif metric == vm.COS_EPS:
        out += [Band("bad", None, thr("cos_eps_random"))]
    elif metric == vm.Z_STD:
        out += [Band("good", thr("z_std_low_warning"), thr("z_std_high_warning")),
                Band("bad", None, thr("z_std_low_critical")),
                Band("bad", thr("z_std_high_critical"), None)]
    elif metric == vm.PAIRWISE_PREFIX + "mean" and scale:
        out += [Band("good", thr("pairwise_low_warning") / scale**2, None),
                Band("bad", None, thr("pairwise_low_critical") / scale**2)]
    elif metric == vm.FINAL_PREFIX + "std" and scale:
        target, warn, crit = 1 / scale, thr("final_std_ratio_warning"), thr("final_std_ratio_critical")
        out += [Band("good", target / warn, target * warn), Band("bad", None, target / crit),
                Band("bad", target * crit, None)]
    elif metric == vm.FINAL_PREFIX + "mean" and scale:
        limit = thr("final_mean_shift") / scale
        out += [Band("good", -limit, limit)]
    elif metric in (vm.FINAL_PREFIX + "min", vm.FINAL_PREFIX + "max"):
        convert = thr("guide_example_scale") / scale if scale else 1.0
        warn, crit = thr("final_extreme_warning") * convert, thr("final_extreme_critical") * convert
        out += [Band("good", -warn, warn), Band("bad", None, -crit), Band("bad", crit, None)]
    return out
