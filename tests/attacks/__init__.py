"""Hostile peers for the hardening tests (issue 12): scripts run inside a test host's netns."""
