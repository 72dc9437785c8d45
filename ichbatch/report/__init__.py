"""Report writers: the per-study CSV, the PDF report, and shared output helpers."""
