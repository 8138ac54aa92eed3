"""Run reports: the end-of-run summary (``report.md``) and the HTML report (``report.html``)."""

from ldmkit.report.html import REPORT_FILE, render_html, write_html_report
from ldmkit.report.summary import summary_text, write_report

__all__ = ["REPORT_FILE", "render_html", "summary_text", "write_html_report", "write_report"]
