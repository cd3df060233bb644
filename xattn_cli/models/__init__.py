"""Model adapters, loaders and the registry: everything that knows a model family lives here; each adapter
states its `layout.Layout`. May import errors, tensors, device, capture, methods, nn, text, cache, config;
never explainers, eval, io, render or cli."""
