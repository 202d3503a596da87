"""apo_ray: Adversarial Preference Optimization as a Ray actor system (layers: docs/architecture.md)."""
