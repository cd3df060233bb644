"""Input and output: robust image decoding, input expansion, atomic artifacts and the results log.
Imports `errors` only of ours: no model, method or rendering knowledge."""
