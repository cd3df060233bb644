"""The procedural shapes world (scenes with exact ground truth) and its dataset export. Imports io and errors only."""
