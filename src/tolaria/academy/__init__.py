"""The academy: continuous controller learning (ACADEMY.md)."""
