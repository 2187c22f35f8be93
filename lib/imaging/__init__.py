"""Pure arrays and geometry (layer 1): resampling, thick slices, vertebra instances, label shifts, quality."""
