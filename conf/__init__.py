"""stx's config tree, shipped in the wheel as the package ``stx.conf`` (Hydra: ``pkg://stx.conf``)."""
