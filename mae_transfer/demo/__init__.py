"""The end-to-end demo: sample data -> MAE pretraining -> transfer, MAE vs random init -> report.

- ``context``: the plan (sizes) and the context the stages share;
- ``stages``: ``stage(ctx) -> None`` for each step; the transfer stages call
  ``mae_transfer.runners.run_task``, as ``mae-transfer bench`` does;
- ``runner``: ``run_demo`` runs the stages in order with a progress line (stage, elapsed, ETA),
  keeps going when one fails (the report shows its error), and writes the report also when
  interrupted with Ctrl-C;
- ``report``: ``report.md`` and ``results.json``; ``figures``: the plots it embeds.
"""
from mae_transfer.demo.context import INIT_LABELS, INITS, DemoContext, DemoPlan
from mae_transfer.demo.report import write_report
from mae_transfer.demo.runner import run_demo, run_stages
from mae_transfer.demo.stages import STAGES

__all__ = ["INITS", "INIT_LABELS", "STAGES", "DemoContext", "DemoPlan", "run_demo", "run_stages", "write_report"]
