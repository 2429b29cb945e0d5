"""Fakes at the edges of the system: a scriptable model server and a real-socket runner."""
