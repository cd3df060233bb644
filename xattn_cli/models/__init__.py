"""Model adapters: everything that knows a model family lives here."""
