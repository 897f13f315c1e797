"""End-to-end workflows built from the toolkit's stages (the CPU demo's brand adapter)."""
