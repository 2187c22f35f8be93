"""One module per notebook (layer 4): ``notebooks/NN_stage.ipynb`` = ``lib/stages/<stage>.py``."""
