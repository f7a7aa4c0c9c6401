"""Plots and the self-contained HTML report of an ANDC pipeline run (``write_report``)."""
from cctk.report.html import render_report, write_report

__all__ = ["write_report", "render_report"]
