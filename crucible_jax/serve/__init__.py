"""Using a trained model: export (jax.export), an embedding index, the search service and its web page."""
