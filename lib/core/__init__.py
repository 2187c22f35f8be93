"""Foundations (layer 0): labels, paths, cases, seeding, params, parallel map, run info."""
