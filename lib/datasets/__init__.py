"""On-disk data layouts (layer 2): the CTSpine1K release, VerSe, nnU-Net v2, label tables, downloads."""
