"""The experiment recipe and what it needs around it: validation, planning, the score cache and resume log."""
