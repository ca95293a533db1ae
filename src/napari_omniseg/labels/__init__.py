"""Label stores (OME-Zarr), the complete label map rule, GeoJSON and measurements."""
