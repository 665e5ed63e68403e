"""The readiness report: data model (versioned), and its JSON / Markdown renderings."""

from kdeploy.report.model import SCHEMA_VERSION, Report

__all__ = ["Report", "SCHEMA_VERSION"]
