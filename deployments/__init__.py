"""Ray Serve adapters over vlm_core."""
