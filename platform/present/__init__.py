"""Presenting a sweep: the report's MLflow reading, sections and rendering."""
