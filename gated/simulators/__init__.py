"""Spec-faithful simulators of the ticketing APIs: real HTTP on 127.0.0.1 for tests and dry runs."""
