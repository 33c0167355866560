"""Self-contained HTML pages (Jinja2 templates, autoescaped): the audit report, the classifier report and the
synthetic-data quality page."""
