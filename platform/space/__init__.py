"""The search space: its schema, validation, and how a trial's config is drawn from it."""
