"""Cohorts: structured rules over features, event windows and model scores, and their
evaluation into membership changes."""
