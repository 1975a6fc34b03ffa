"""The printed results of an evaluation: gIoU / cIoU per granularity, and eval.py's summary."""

from __future__ import annotations

GROUPS = ("all", "object", "part")


def print_table(metrics: dict, title: str = "", instances: dict | None = None) -> None:
    """gIoU, cIoU and mask count of each granularity present in ``metrics`` (one split's
    ``SegmentationMetrics.result()``), then the instance separation (``instances``: an
    ``InstanceSeparation.result()``) when any question named several instances of one kind."""
    if title:
        print(title)
    print(f"  {'targets':<8} {'gIoU':>7} {'cIoU':>7} {'masks':>7}")
    for group in GROUPS:
        r = metrics.get(group)
        if r:
            print(f"  {group:<8} {r['giou']:7.4f} {r['ciou']:7.4f} {r['masks']:7d}")
    if instances and instances.get("all"):
        a = instances["all"]
        parts = ", ".join(f"{g}s {instances[g]['rate']:.3f}" for g in GROUPS[1:] if g in instances)
        print(f"  instance separation {a['rate']:.4f}: {a['separated']} of {a['masks']} masks "
              f"closer to their own target than to another instance of their kind "
              f"({a['questions']} questions; {parts})")


def print_summary(s: dict) -> None:
    """eval.py's summary (what :func:`m2sa_jax.evaluation.run.run` returns): the table, the
    counts, the generate protocol's answer statistics and the skipped records."""
    print_table(s["metrics"], f"{s['dataset']} {s['split']} ({s['protocol'].replace('_', '-')}), "
                              f"{s['checkpoint']}", s.get("instance_separation"))
    c = s["counts"]
    print(f"  images {c['images']}, questions {c['questions']}, masks {c['masks']}; "
          f"{s['samples_per_s']:.2f} questions/s")
    g = s.get("generate")
    if g:
        print(f"  generated answers: {g['exact']} with as many [SEG] as targets, {g['fewer']} "
              f"fewer ({g['missing_masks']} targets scored as empty), {g['more']} more "
              f"({g['extra_masks']} extra masks, not scored)")
    if s["skipped"]:
        print("  skipped records: " + ", ".join(f"{k} {v}" for k, v in sorted(s["skipped"].items())))
