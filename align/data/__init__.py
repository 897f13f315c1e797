"""Data for the trainers: loading, filtering, caching of text embeddings and VAE latents, collation."""
