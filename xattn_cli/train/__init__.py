"""Seeded recipes that produce the bundled weights in assets/weights/."""
