"""Input and output: robust image decoding, input expansion, atomic artifacts and the results log."""
