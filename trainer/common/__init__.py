"""Small helpers every part of the engine uses, each written once (see docs/architecture.md)."""
