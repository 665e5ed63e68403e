"""JSON Schemas for the report (`report.json`) and for target profiles, from the pydantic models.

The schemas are generated from the models that write and validate those files, so they ship
with the package and cannot drift from it. `kdeploy schema report|profile` prints them.
"""

from __future__ import annotations

from typing import Any

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMAS = ("report", "profile")


def report_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of `report.json` as kdeploy writes it."""
    from kdeploy.report.model import SCHEMA_VERSION, Report

    schema = Report.model_json_schema(mode="serialization")
    return {"$schema": DRAFT, "$id": f"https://kdeploy.dev/schema/report-{SCHEMA_VERSION}.json",
            "title": "kdeploy report", **{k: v for k, v in schema.items() if k != "title"},
            "description": f"kdeploy readiness report, schema_version {SCHEMA_VERSION}.x"}


def profile_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a target profile file (TOML, or the same data as JSON/YAML)."""
    from kdeploy.profiles import TargetProfile

    schema = TargetProfile.model_json_schema(mode="validation")
    return {"$schema": DRAFT, "$id": "https://kdeploy.dev/schema/profile.json", "title": "kdeploy target profile",
            **{k: v for k, v in schema.items() if k != "title"}}


def schema(name: str) -> dict[str, Any]:
    """Returns the schema called `name` (`report` or `profile`).

    Raises:
        UsageError: unknown name.
    """
    if name == "report":
        return report_schema()
    if name == "profile":
        return profile_schema()
    from kdeploy.errors import UsageError

    raise UsageError(f"unknown schema {name!r}; allowed: {', '.join(SCHEMAS)}")
