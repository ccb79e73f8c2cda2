"""patchmorph_core package."""
