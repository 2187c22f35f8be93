"""Synthetic data (layer 2): the spine CT phantom, fake identities and the source plan, the oracle."""
